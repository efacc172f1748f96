// One selection of images for the whole app, and the bar that acts on it.
// In any grid: ctrl/cmd-click toggles an image, shift-click selects the range from the last one
// clicked; a drag with shift held on a grid's background draws a rubber band. The map adds its
// lasso. The bar (bottom of the window) shows the count and adds, moves, discards or tags them all
// in one request; Escape clears it.
import {api, el, toast} from "./api.js";

const selected = new Set();
let source = null;          // {bucketId, name}: the bucket the selection was made in (move/remove)
let buckets = [];
let anchor = null;          // the last cell clicked, for shift ranges
const grids = new Set();
const bar = el("div", {id: "selection-bar", class: "selection-bar", role: "region", "aria-label": "selection", hidden: true});
document.body.append(bar);

export const selectionIds = () => [...selected];
export const selectionCount = () => selected.size;

function changed() {
  for (const grid of grids) paint(grid);
  render();
  document.dispatchEvent(new CustomEvent("imagelake:selection", {detail: selected.size}));
}

export function clearSelection() {
  selected.clear();
  anchor = null;
  changed();
}

// Replace (or extend) the selection; `from` names the bucket the images were picked in.
export function selectIds(ids, {extend = false, from = null} = {}) {
  if (!extend) selected.clear();
  for (const id of ids) selected.add(id);
  source = from;
  changed();
}

function paint(grid) {
  for (const cell of grid.querySelectorAll(".cell[data-image-id]")) {
    cell.classList.toggle("selected", selected.has(cell.dataset.imageId));
  }
}

// Make the `.cell[data-image-id]` children of `grid` selectable. `from()` tells which bucket the
// grid shows (or null). A plain click keeps its meaning in the view (focus, open the drawer).
export function selectable(grid, {from = () => null} = {}) {
  grids.add(grid);
  new MutationObserver(() => paint(grid)).observe(grid, {childList: true, subtree: true});
  grid.addEventListener("click", (e) => {
    const cell = e.target.closest(".cell[data-image-id]");
    if (!cell || !(e.ctrlKey || e.metaKey || e.shiftKey)) return;
    e.preventDefault();
    e.stopImmediatePropagation();
    const id = cell.dataset.imageId;
    if (cell.dataset.members && !e.shiftKey) {  // a stack of near-duplicates: all its members at once
      const members = cell.dataset.members.split(",");
      const on = !selected.has(id);
      for (const m of members) on ? selected.add(m) : selected.delete(m);
      anchor = id;
      source = from();
      return changed();
    }
    const cells = [...grid.querySelectorAll(".cell[data-image-id]")];
    if (e.shiftKey && anchor && cells.some((c) => c.dataset.imageId === anchor)) {
      const a = cells.findIndex((c) => c.dataset.imageId === anchor), b = cells.indexOf(cell);
      for (const c of cells.slice(Math.min(a, b), Math.max(a, b) + 1)) selected.add(c.dataset.imageId);
    } else if (selected.has(id)) {
      selected.delete(id);
    } else {
      selected.add(id);
    }
    anchor = id;
    source = from();
    changed();
  }, true);
  // rubber band: shift + drag starting between the cells (or anywhere with shift on a grid)
  grid.addEventListener("pointerdown", (e) => {
    if (!e.shiftKey || e.button !== 0) return;
    const start = {x: e.clientX, y: e.clientY};
    const band = el("div", {class: "rubber-band"});
    let moved = false;
    const move = (m) => {
      const x = Math.min(start.x, m.clientX), y = Math.min(start.y, m.clientY);
      const w = Math.abs(m.clientX - start.x), h = Math.abs(m.clientY - start.y);
      if (!moved && w + h < 6) return;
      if (!moved) { document.body.append(band); moved = true; }
      Object.assign(band.style, {left: `${x}px`, top: `${y}px`, width: `${w}px`, height: `${h}px`});
    };
    const up = (u) => {
      window.removeEventListener("pointermove", move);
      window.removeEventListener("pointerup", up);
      if (!moved) return;
      band.remove();
      const r = {left: Math.min(start.x, u.clientX), right: Math.max(start.x, u.clientX),
                 top: Math.min(start.y, u.clientY), bottom: Math.max(start.y, u.clientY)};
      const hit = [...grid.querySelectorAll(".cell[data-image-id]")].filter((c) => {
        const b = c.getBoundingClientRect();
        return b.right > r.left && b.left < r.right && b.bottom > r.top && b.top < r.bottom;
      });
      for (const c of hit) selected.add(c.dataset.imageId);
      source = from();
      // the click that ends a drag must not toggle the last cell again
      grid.addEventListener("click", (c) => { c.stopImmediatePropagation(); c.preventDefault(); }, {capture: true, once: true});
      changed();
    };
    window.addEventListener("pointermove", move);
    window.addEventListener("pointerup", up);
  });
}

async function loadBuckets() {
  try { buckets = (await api("/buckets")).buckets.filter((b) => !b.system); } catch { buckets = []; }
  render();
}

function render() {
  bar.hidden = selected.size === 0;
  if (!selected.size) return;
  const scope = document.body.dataset.scope;
  const choose = el("select", {id: "selection-bucket", "aria-label": "bucket for the selection"},
    ...buckets.filter((b) => !source || b.bucket_id !== source.bucketId).map((b) => el("option", {value: b.bucket_id}, b.name)));
  const n = selected.size;
  const label = `${n} image${n === 1 ? "" : "s"} selected`;
  const write = scope !== "read";
  bar.replaceChildren(
    el("strong", {id: "selection-count"}, label),
    source ? el("span", {class: "muted"}, ` in "${source.name}"`) : "",
    ...(write ? [choose,
      el("button", {type: "button", id: "selection-add", onclick: () => act("add", choose.value)}, source ? "copy there" : "add"),
      source ? el("button", {type: "button", id: "selection-move", onclick: () => act("move", choose.value)}, "move there") : "",
      source ? el("button", {type: "button", id: "selection-remove", onclick: () => act("remove")}, "remove from bucket") : "",
      el("button", {type: "button", id: "selection-discard", onclick: () => act("discard")}, "discard"),
      tagForm()] : []),
    el("button", {type: "button", class: "link", id: "selection-clear", onclick: clearSelection}, "clear"));
  if (!buckets.length && write && !bar.dataset.loading) {
    bar.dataset.loading = "1";
    loadBuckets().finally(() => delete bar.dataset.loading);
  }
}

// bulk tag: one POST /tags/bulk for the whole selection (the user tags teach the learned model)
function tagForm() {
  const input = el("input", {id: "selection-tag", placeholder: "tag", size: 10, maxlength: 64, "aria-label": "tag the selection"});
  const send = async (e) => {
    e.preventDefault();
    const tag = input.value.trim();
    if (!tag) return input.focus();
    const ids = [...selected];
    try {
      const body = await api("/tags/bulk", {method: "POST", json: {image_ids: ids, add: [tag]}});
      const got = Object.values(body.added || {})[0] ?? 0;
      toast(`tagged ${ids.length} image${ids.length === 1 ? "" : "s"} "${tag.toLowerCase()}" (${got} new)`);
      document.dispatchEvent(new CustomEvent("imagelake:tagged", {detail: {tag, ids}}));
      input.value = "";
    } catch (err) { toast(err.message, "error"); }
  };
  input.addEventListener("keydown", (e) => { e.stopPropagation(); if (e.key === "Enter") send(e); });
  return el("span", {class: "selection-tag"}, input, el("button", {type: "button", id: "selection-tag-add", onclick: send}, "tag"));
}

const names = (id) => (buckets.find((b) => b.bucket_id === id) || {}).name || id;

async function act(kind, bucketId) {
  const ids = [...selected];
  try {
    let what;
    if (kind === "discard") {
      await api("/discard", {method: "POST", json: source ? {image_ids: ids, from: source.bucketId} : {image_ids: ids}});
      what = `${ids.length} discarded`;
    } else if (kind === "remove") {
      for (const id of ids) await api(`/buckets/${source.bucketId}/images/${id}`, {method: "DELETE"});
      what = `${ids.length} removed from "${source.name}"`;
    } else {
      if (!bucketId) return toast("create a bucket first (Curate view)", "error");
      const json = source ? {image_ids: ids, from: source.bucketId, mode: kind === "move" ? "move" : "copy"} : {image_ids: ids};
      await api(`/buckets/${bucketId}/images`, {method: "POST", json});
      what = `${ids.length} ${kind === "move" ? "moved" : "added"} to "${names(bucketId)}"`;
    }
    toast(what);
    selected.clear();
    changed();
    document.dispatchEvent(new CustomEvent("imagelake:buckets-changed", {detail: {kind, bucketId, ids}}));
    loadBuckets();
  } catch (e) { toast(e.message, "error"); }
}

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && selected.size && !e.target.closest("input, textarea, select")) clearSelection();
});
document.addEventListener("imagelake:buckets-changed", () => { buckets = []; });
