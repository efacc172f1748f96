// The ? overlay: every key of the Curate view (and the app-wide ones); any key or click closes it.
import {el} from "./api.js";

const ROWS = [["1–9", "drop the focused image (or the selection) into bucket N; again with another number moves it"],
              ["x", "discard the focused image (in a review: mark it as not belonging)"],
              ["u", "undo your last action (the header's Undo button names it)"], ["U", "redo what you undid"],
              ["ctrl+Z / ctrl+shift+Z", "undo / redo, in every view"],
              ["e", "expand a near-duplicate stack (×N) into its images; a key on the stack sorts them all"],
              ["←↑→↓", "move the focus"], ["n", "next page: the untouched images become negatives"],
              ["f", "fast-forward: the model's top 28 join pending review"], ["t", "Grid / Tetris"],
              ["Enter", "Tetris: accept the suggested bucket"], ["ctrl/shift-click, shift-drag", "select images"],
              ["Escape", "close the drawer, clear the selection"], ["?", "this help"]];

export function keysHelp() {
  const box = el("div", {class: "keys-help", id: "keys-help", role: "dialog", "aria-label": "keys"},
    el("h3", {}, "Keys"), el("table", {}, ROWS.map(([k, what]) => el("tr", {}, el("td", {}, el("kbd", {}, k)), el("td", {}, what)))),
    el("p", {class: "muted"}, "any key or click closes this"));
  const close = (e) => { e.preventDefault(); e.stopImmediatePropagation(); box.remove();
                         document.removeEventListener("keydown", close, true); };
  box.addEventListener("click", close);
  document.addEventListener("keydown", close, true);
  document.body.append(box);
}
