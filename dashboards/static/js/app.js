// The app shell: tabs as hash routes; each view is mounted the first time it is shown.
import {api, toast} from "./api.js";
import {mountBrowse} from "./browse.js";
import {mountDetails} from "./details.js";
import {mountSql} from "./sql.js";
import "./selection.js";  // the app-wide selection and its bar
import {mountUndo} from "./undo.js";

const body = document.body;
const thumbSmall = Number(body.dataset.thumbSmall);
const thumbLarge = Number(body.dataset.thumbLarge);
const details = mountDetails(document.getElementById("details"), {thumbSize: thumbLarge, onOpen: (id) => details.open(id)});
const context = {thumbSmall, thumbLarge, scope: body.dataset.scope, openDetails: (id) => details.open(id)};

const views = {
  browse: async (root) => mountBrowse(root, {thumbSize: thumbLarge, thumbSmall, onOpen: context.openDetails}).load(),
  sql: async (root) => mountSql(root),
  curate: async (root) => (await import("./curate.js")).mountCurate(root, context),
  map: async (root) => (await import("./map.js")).mountMap(root, context),
  search: async (root) => (await import("./search.js")).mountSearch(root, context),
  unusual: async (root) => (await import("./unusual.js")).mountUnusual(root, context),
  buckets: async (root) => (await import("./buckets.js")).mountBuckets(root, context),
};
const mounted = {};
mountUndo(document.getElementById("undo-control"));

async function show() {
  // "#buckets/<id>": a view and its argument
  const [name, arg] = (location.hash || "#curate").slice(1).split("/");
  const view = views[name] ? name : "curate";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const tab of document.querySelectorAll("#tabs a")) tab.classList.toggle("active", tab.dataset.view === view);
  document.dispatchEvent(new CustomEvent("imagelake:view", {detail: view}));
  if (!mounted[view]) {
    mounted[view] = true;
    try {
      mounted[view] = (await views[view](document.getElementById(`view-${view}`))) || true;
    } catch (e) {
      mounted[view] = false;
      toast(e.message, "error");
    }
  }
  if (mounted[view] && mounted[view].route) await mounted[view].route(arg);
}

document.getElementById("logout").addEventListener("click", async () => {
  await api("/session", {method: "DELETE"});
  location.assign("/login");
});
window.addEventListener("hashchange", show);
show();
