// Browse: pages of thumbnails per collection, straight from GET /images, narrowed by the filter
// bar (browse_filters.js: folder, tag, bucket, cluster, capture fields, a filter-language object).
import {api, el, thumbUrl, toast} from "./api.js";
import {mountBrowseFilters} from "./browse_filters.js";
import {selectable} from "./selection.js";

const PAGE = 60;

export function mountBrowse(root, {thumbSize, thumbSmall, onOpen}) {
  const grid = root.querySelector("#browse-grid");
  const nav = root.querySelector("#browse-collections");
  const pager = root.querySelector("#browse-pager");
  const title = root.querySelector("#browse-title");
  let state = {collection: null, page: 0};
  selectable(grid);
  const filters = mountBrowseFilters(root, {thumbSize: thumbSmall || thumbSize, onChange: () => { state.page = 0; load().catch((e) => toast(e.message, "error")); }});
  filters.load();

  async function load() {
    const params = new URLSearchParams({limit: PAGE, offset: state.page * PAGE});
    if (state.collection) params.set("collection", state.collection);
    for (const [key, value] of Object.entries(filters.params())) params.set(key, value);
    const body = await api(`/images?${params}`);
    const all = Object.values(body.collections).reduce((a, b) => a + b, 0);
    nav.replaceChildren(
      el("button", {type: "button", class: state.collection ? "" : "active", onclick: () => go(null)}, `all (${all})`),
      ...Object.entries(body.collections).map(([name, n]) =>
        el("button", {type: "button", class: name === state.collection ? "active" : "", onclick: () => go(name)}, `${name} (${n})`)));
    const filtered = filters.summary();
    title.textContent = `${state.collection || "All images"} · ${body.total} images${filtered ? ` · ${filtered}` : ""}`;
    grid.replaceChildren(...body.images.map((im) =>
      el("button", {type: "button", class: im.stack ? "cell stack" : "cell",
                    title: im.stack ? `a stack of ${im.stack.size} near-duplicates: e expands it, 1–9 sorts them all into a bucket`
                                    : `#${im.seq} ${im.width}×${im.height} ${im.format}`,
                    dataset: {imageId: im.image_id, ...(im.stack ? {members: im.stack.members.join(","), clusterId: im.stack.cluster_id} : {})},
                    onclick: () => onOpen(im.image_id)},
         el("img", {loading: "lazy", alt: `image ${im.seq}`, src: thumbUrl(im.image_id, thumbSize)}),
         im.stack ? el("span", {class: "stack-count"}, `×${im.stack.size}`) : "")));
    if (!body.images.length) grid.append(el("p", {class: "empty"}, filtered ? "No image matches these filters." : "No images yet. Run imagelake ingest --images FOLDER."));
    pager.replaceChildren(
      state.page > 0 ? el("button", {type: "button", onclick: () => { state.page--; load(); }}, "← previous") : "",
      (state.page + 1) * PAGE < body.total ? el("button", {type: "button", onclick: () => { state.page++; load(); }}, "next →") : "");
  }

  // a focused stack: e expands it, 1–9 sorts every member into that bucket (Curate's numbering)
  grid.addEventListener("keydown", async (e) => {
    const cell = e.target.closest(".cell.stack");
    if (!cell || e.ctrlKey || e.metaKey || e.altKey) return;
    const members = cell.dataset.members.split(",");
    if (e.key === "e") {
      e.preventDefault();
      filters.expand(cell.dataset.clusterId, members.length);
    } else if (/^[1-9]$/.test(e.key)) {
      const bucket = filters.buckets()[Number(e.key) - 1];
      if (!bucket) return;
      e.preventDefault();
      try {
        await api(`/buckets/${bucket.bucket_id}/images`, {method: "POST", json: {image_ids: members}});
        toast(`${members.length} near-duplicates added to "${bucket.name}"`);
        cell.classList.add("sorted");
        document.dispatchEvent(new CustomEvent("imagelake:buckets-changed", {detail: {kind: "add", bucketId: bucket.bucket_id, ids: members}}));
      } catch (err) { toast(err.message, "error"); }
    }
  });

  function go(collection) {
    state = {collection, page: 0};
    load();
  }

  return {load};
}
