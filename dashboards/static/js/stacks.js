// Near-duplicate stacks on a Curate suggestion page (the "Stack near-duplicates" toggle, off by
// default, kept in this browser): images of one near-duplicate group (the pipeline's cluster
// step) show as one cell with a count; a bucket key sorts the whole group, x discards it, e
// expands the stack into its members on the page. Asked of POST /dup-groups once per
// page; without groups (or on an error) the page is as it was.
import {api, el} from "./api.js";

let enabled = localStorage.getItem("imagelake.stacks") === "1";

export function mountStackToggle(container, onChange) {
  const button = el("button", {type: "button", id: "mode-stacks", class: enabled ? "active" : "",
                               title: "show each near-duplicate group as one stack: a key sorts it all, e expands it"}, "Stack near-duplicates");
  button.addEventListener("click", () => {
    enabled = !enabled;
    localStorage.setItem("imagelake.stacks", enabled ? "1" : "0");
    button.classList.toggle("active", enabled);
    onChange();
  });
  container.insertBefore(button, container.querySelector("#curate-status"));
}

export async function stackSuggestions(items) {
  if (!enabled || !items.length) return items;
  let groups;
  try {
    groups = (await api("/dup-groups", {method: "POST", json: {image_ids: items.map((s) => s.image_id)}})).groups;
  } catch { return items; }
  const seen = new Set();
  const out = [];
  for (const item of items) {
    const group = groups[item.image_id];
    if (!group) { out.push(item); continue; }
    if (seen.has(group.cluster_id)) continue;  // the group is already a stack on this page
    seen.add(group.cluster_id);
    out.push({...item, stack: group});
  }
  return out;
}

// the ids a placement of this page item acts on: a stack's whole group, else the image
export const idsOf = (page, imageId) => ((page.find((p) => p.image_id === imageId) || {}).stack || {members: [imageId]}).members;

// e on a stack: its members take its place, each a cell of its own (those not on the page yet)
export function expandStack(page, index) {
  const item = page[index];
  if (!item || !item.stack) return page;
  const shown = new Set(page.map((p) => p.image_id));
  const members = item.stack.members.filter((id) => id === item.image_id || !shown.has(id))
    .map((id) => ({image_id: id, score: item.score, source: item.source, placed: item.placed}));
  return [...page.slice(0, index), ...members, ...page.slice(index + 1)];
}
