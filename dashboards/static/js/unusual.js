// Most unusual: GET /images/unusual (the outliers table), a grid of thumbnails with their score.
import {api, el, thumbUrl} from "./api.js";
import {selectable} from "./selection.js";

const N = 56;

export function mountUnusual(root, {thumbLarge, openDetails}) {
  const grid = root.querySelector("#unusual-grid");
  const status = root.querySelector("#unusual-status");
  selectable(grid);

  async function load() {
    status.textContent = "loading…";
    try {
      const body = await api(`/images/unusual?n=${N}`);
      grid.replaceChildren(...body.results.map((r, i) =>
        el("button", {type: "button", class: "cell", title: `#${i + 1} · unusualness ${r.score.toFixed(3)}`,
                      dataset: {imageId: r.image_id, score: r.score}, onclick: () => openDetails(r.image_id)},
           el("img", {loading: "lazy", alt: `unusual image ${i + 1}`, src: thumbUrl(r.image_id, thumbLarge)}),
           el("span", {class: "caption"}, `score ${r.score.toFixed(3)}`))));
      status.textContent = `· ${body.results.length} images`;
    } catch (e) {
      grid.replaceChildren(el("p", {class: "empty"}, e.status === 503 ? e.message : `could not load: ${e.message}`));
      status.textContent = "";
    }
  }

  return {route: load};
}
