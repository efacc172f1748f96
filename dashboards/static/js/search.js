// Search: upload an image (or come from a clicked one) and show the most similar images.
import {api, el, thumbUrl} from "./api.js";
import {selectable} from "./selection.js";

export function mountSearch(root, {thumbLarge, openDetails}) {
  const form = root.querySelector("#search-form");
  const file = root.querySelector("#search-file");
  const status = root.querySelector("#search-status");
  const results = root.querySelector("#search-results");
  selectable(results);

  function show(items) {
    results.replaceChildren(...items.map((r) =>
      el("button", {type: "button", class: "cell", title: `score ${r.score.toFixed(3)}`, dataset: {imageId: r.image_id},
                    onclick: () => openDetails(r.image_id)},
         el("img", {loading: "lazy", alt: "similar image", src: thumbUrl(r.image_id, thumbLarge)}))));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files.length) {
      status.textContent = "choose an image file first";
      return;
    }
    const data = new FormData();
    data.append("image", file.files[0]);
    status.textContent = "searching…";
    status.className = "muted";
    try {
      const body = await api("/search/similar?k=28", {method: "POST", form: data});
      show(body.results);
      status.textContent = `${body.results.length} similar images`;
    } catch (e) {
      status.textContent = e.message;
      status.className = "error";
    }
  });

  return {show};
}
