// Undo / redo for the whole app: two buttons in the header that name what they act on
// ("Undo: add 3 to Cats", "Redo: move 1 to Dogs"), asked of GET /undo after every bucket write
// (api.js announces each with "imagelake:wrote"). Keys: ctrl/cmd+Z undo, ctrl/cmd+shift+Z or
// ctrl+Y redo, anywhere outside a text field (Curate also has u / U).
// An undo announces "imagelake:undone" (detail: the cancelled event, named); a redo announces
// "imagelake:buckets-changed" like any other write, so the views update their badges and counts.
import {api, el, toast} from "./api.js";

let targets = {undo: null, redo: null};
let asking = null;
let busy = false;

// what an event did, in a person's words: "add 3 to Cats", "move 1 to Dogs", "create Birds"
export function describe(event) {
  if (!event) return "";
  const n = (event.image_ids || []).length;
  const name = event.bucket_id === "discard" ? "the discard pile" : (event.bucket_name || event.bucket_id || "");
  switch (event.action) {
    case "add": return event.bucket_id === "discard" ? `discard ${n}` : `add ${n} to ${name}`;
    case "copy": return `copy ${n} to ${name}`;
    case "move": return `move ${n} to ${name}`;
    case "discard": return `discard ${n}`;
    case "remove": return event.bucket_id === "discard" ? `take ${n} off the discard pile` : `remove ${n} from ${name}`;
    case "pending": return `fast-forward ${n} into ${name}`;
    case "feedback": return `feedback on ${name} (${n} accepted, ${(event.rejected_ids || []).length} rejected)`;
    case "create": return `create ${name}`;
    case "update": return `${(event.changes || ["name"]).includes("name") ? "rename" : "recolor"} ${name}`;
    case "delete": return `delete ${name}`;
    default: return `${event.action} ${name}`;
  }
}

const undoButton = el("button", {type: "button", id: "undo-button", class: "undo", disabled: true,
                                 title: "undo your last bucket action (ctrl+Z; u in Curate)", onclick: () => undoLast()}, "Nothing to undo");
const redoButton = el("button", {type: "button", id: "redo-button", class: "undo", disabled: true,
                                 title: "redo what you undid last (ctrl+shift+Z; U in Curate)", onclick: () => redoLast()}, "Nothing to redo");

function render() {
  undoButton.disabled = busy || !targets.undo;
  redoButton.disabled = busy || !targets.redo;
  undoButton.textContent = targets.undo ? `Undo: ${describe(targets.undo)}` : "Nothing to undo";
  redoButton.textContent = targets.redo ? `Redo: ${describe(targets.redo)}` : "Nothing to redo";
  undoButton.dataset.eventId = targets.undo ? targets.undo.event_id : "";
  // the whole label on hover, when a long bucket name is cut short
  undoButton.title = `${undoButton.textContent} (ctrl+Z; u in Curate)`;
  redoButton.title = `${redoButton.textContent} (ctrl+shift+Z; U in Curate)`;
}

// one question at a time; a write made while it is in flight asks again when it returns
let again = false;
export async function refreshUndo() {
  if (asking) { again = true; return asking; }
  asking = (async () => {
    do {
      again = false;
      try { const body = await api("/undo"); targets = {undo: body.undo, redo: body.redo}; } catch { /* keep the last */ }
    } while (again);
    render();
  })();
  try { await asking; } finally { asking = null; }
}

export async function undoLast() {
  if (busy) return null;
  busy = true;
  render();
  try {
    const body = await api("/undo", {method: "POST", json: {}});
    const undone = body.undone || {};
    toast(`undone: ${describe(undone)}`);
    document.dispatchEvent(new CustomEvent("imagelake:undone", {detail: undone}));
    return undone;
  } catch (e) { toast(e.message, "error"); return null; } finally { busy = false; refreshUndo(); }
}

export async function redoLast() {
  if (busy) return null;
  busy = true;
  render();
  try {
    const body = await api("/redo", {method: "POST", json: {}});
    const redone = body.redone || {};
    toast(`redone: ${describe(redone)}`);
    const kind = {add: "add", copy: "add", move: "move", discard: "discard", remove: "remove"}[redone.action] || redone.action;
    document.dispatchEvent(new CustomEvent("imagelake:buckets-changed",
      {detail: {kind, bucketId: redone.bucket_id, ids: redone.image_ids || [], redone}}));
    return redone;
  } catch (e) { toast(e.message, "error"); return null; } finally { busy = false; refreshUndo(); }
}

export function mountUndo(slot) {
  if (document.body.dataset.scope === "read") return;  // a read token cannot write, so cannot undo
  slot.replaceChildren(undoButton, redoButton);
  document.addEventListener("imagelake:wrote", () => refreshUndo());
  document.addEventListener("keydown", (e) => {
    if (!(e.ctrlKey || e.metaKey) || e.altKey || e.target.closest("input, textarea, select")) return;
    const key = e.key.toLowerCase();
    if (key === "z" && !e.shiftKey) undoLast();
    else if ((key === "z" && e.shiftKey) || key === "y") redoLast();
    else return;
    e.preventDefault();
  });
  refreshUndo();
}
