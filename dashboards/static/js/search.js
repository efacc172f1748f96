// Search: words (GET /search/text: concept names, tags, metadata values) or an uploaded image
// (or a clicked one) -> the best matching images, each captioned with what matched.
import {api, el, thumbUrl} from "./api.js";
import {selectable} from "./selection.js";

export function mountSearch(root, {thumbLarge, openDetails}) {
  const form = root.querySelector("#search-form");
  const file = root.querySelector("#search-file");
  const words = root.querySelector("#search-text");
  const status = root.querySelector("#search-status");
  const results = root.querySelector("#search-results");
  selectable(results);

  function show(items) {
    results.replaceChildren(...items.map((r) => {
      const matched = (r.matched || []).join(", ");
      return el("button", {type: "button", class: "cell", title: `score ${r.score.toFixed(3)}${matched ? ` · ${matched}` : ""}`,
                           dataset: {imageId: r.image_id}, onclick: () => openDetails(r.image_id)},
         el("img", {loading: "lazy", alt: matched ? `match: ${matched}` : "similar image", src: thumbUrl(r.image_id, thumbLarge)}),
         matched ? el("span", {class: "caption"}, `${matched} · ${r.score.toFixed(2)}`) : "");
    }));
  }

  // a new file choice means "search by this file"; typing means "search by words"
  file.addEventListener("change", () => { if (file.files.length) words.value = ""; });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const q = words.value.trim();
    if (!q && !file.files.length) {
      status.textContent = "type words or choose an image file first";
      status.className = "error";
      return;
    }
    status.textContent = "searching…";
    status.className = "muted";
    try {
      if (q) {
        const body = await api(`/search/text?${new URLSearchParams({q, k: 28})}`);
        show(body.results);
        status.textContent = body.results.length ? `${body.results.length} images match "${q}"` : `no image matches "${q}"`;
      } else {
        const data = new FormData();
        data.append("image", file.files[0]);
        const body = await api("/search/similar?k=28", {method: "POST", form: data});
        show(body.results);
        status.textContent = `${body.results.length} similar images`;
      }
    } catch (e) {
      status.textContent = e.message;
      status.className = "error";
    }
  });

  return {show};
}
