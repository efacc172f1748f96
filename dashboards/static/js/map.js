// The map: the deep-zoom grid of the whole collection (OpenSeadragon over the DZI tiles), a click
// opens the image under the pointer, and an overlay outlines a bucket's or a tag's cells or colours
// the cells by capture date (map_dates.js).
import {api, el, toast} from "./api.js";
import {clearSelection, selectIds} from "./selection.js";
import {mountDateOverlay} from "./map_dates.js";

const OSD_SRC = "/static/vendor/openseadragon/openseadragon.min.js";
const MAX_OVERLAY = 5000;

function loadScript(src) {
  if (window.OpenSeadragon) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const script = el("script", {src});
    script.onload = resolve;
    script.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.append(script);
  });
}

const SVG = "http://www.w3.org/2000/svg";

export async function mountMap(root, {openDetails}) {
  const select = root.querySelector("#map-layout");
  const overlaySelect = root.querySelector("#map-overlay");
  const status = root.querySelector("#map-status");
  const box = root.querySelector("#map-viewer");
  await loadScript(OSD_SRC);
  const {layouts} = await api("/grid");
  if (!layouts.length) {
    box.replaceChildren(el("p", {class: "empty"}, "No map yet. Run imagelake grid to lay out the collection."));
    return;
  }
  select.replaceChildren(...layouts.map((l) => el("option", {value: l.layout_id}, `${l.layout_id} · ${l.n ?? ""} images`)));
  // the canvas drawer: OpenSeadragon's default WebGL drawer took ~3 s to start and ~4 s to show
  // the first tiles in Chromium without a GPU (software GL), the canvas one a fraction of that
  const viewer = window.OpenSeadragon({
    element: box, drawer: "canvas", prefixUrl: "/static/vendor/openseadragon/images/", showNavigator: true,
    maxZoomPixelRatio: 2, visibilityRatio: 0.5, crossOriginPolicy: false, gestureSettingsMouse: {clickToZoom: false},
  });
  let info = null;

  async function open(layoutId) {
    const body = await api(`/grid/${layoutId}`);
    info = body.dzi;
    viewer.open(`/api/v1/grid/${body.layout.layout_id}.dzi`);
    box.dataset.gridWidth = String(body.layout.width);
    box.dataset.gridHeight = String(body.layout.height);
    const q = body.layout.quality;
    status.textContent = `${body.layout.width}×${body.layout.height} cells` + (q != null ? ` · neighbourhood preservation ${Number(q).toFixed(3)}` : "");
    box.dataset.layoutId = body.layout.layout_id;
  }

  viewer.addHandler("canvas-click", async (event) => {
    if (!event.quick || !info) return;
    const point = viewer.viewport.viewerElementToImageCoordinates(event.position);
    const x = Math.floor(point.x / info.cell_px), y = Math.floor(point.y / info.cell_px);
    try {
      const cell = await api(`/grid/${box.dataset.layoutId}/cell?x=${x}&y=${y}`);
      if (cell.image_id) openDetails(cell.image_id);
    } catch (e) {
      if (e.status !== 404 && e.status !== 400) toast(e.message, "error");
    }
  });
  viewer.addHandler("open", () => {
    box.dataset.ready = "1";
    box.dataset.homeZoom = String(viewer.viewport.getHomeZoom());
  });
  // the first tile on screen: loaded, then painted by the next frame (read by tests/bench/bench_dashboard.py)
  viewer.addHandler("tile-loaded", () => {
    if (box.dataset.firstTile) return;
    box.dataset.firstTile = "1";
    requestAnimationFrame(() => requestAnimationFrame(() => performance.mark("map-first-tile")));
  });
  viewer.addHandler("animation-finish", () => { box.dataset.zoom = String(viewer.viewport.getZoom()); });

  let overlayLayers = [];
  function setLayers(layers) {
    for (const layer of overlayLayers) viewer.removeOverlay(layer);
    overlayLayers = layers.map(([layer, where]) => { viewer.addOverlay(layer, where); return layer; });
  }
  const dates = mountDateOverlay(root.querySelector("#map-dates"), {cellLayer, setLayers, status, box});

  async function overlay(choice) {
    viewer.clearOverlays();
    selectionMarks = [];
    overlayLayers = [];
    dates.hide();
    if (!choice || !info) { status.textContent = ""; return; }
    if (choice === "date") { await dates.show(box.dataset.layoutId); return; }
    const [kind, value] = choice.split(":");
    let cells, color = "#ffd400";
    if (kind === "bucket") {
      const body = await api(`/buckets/${value}?limit=${MAX_OVERLAY}`);
      color = body.bucket.color || color;
      cells = (await api(`/grid/${box.dataset.layoutId}/cells`, {method: "POST", json: {image_ids: body.members}})).cells;
    } else {
      cells = (await api(`/grid/${box.dataset.layoutId}/overlay?tag=${encodeURIComponent(value)}`)).cells;
    }
    viewer.addOverlay(...cellLayer(cells.slice(0, MAX_OVERLAY), {stroke: color, cls: "map-mark"}));
    status.textContent = `${cells.length} cells highlighted`;
  }

  // Marked cells as one SVG overlay in cell units (one element for OpenSeadragon to place, not one
  // per cell: 500 separate overlays took seconds to lay out)
  function cellLayer(cells, {stroke, fill = "none", cls, fillOf = null}) {
    const w = Number(box.dataset.gridWidth), h = Number(box.dataset.gridHeight);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "map-layer");
    for (const c of cells) {
      const r = document.createElementNS(SVG, "rect");
      const f = fillOf ? fillOf(c) : fill;
      for (const [k, v] of Object.entries({x: c.gx + 0.06, y: c.gy + 0.06, width: 0.88, height: 0.88, class: cls,
                                           fill: f, stroke: stroke || f, "stroke-width": 0.12})) r.setAttribute(k, v);
      svg.append(r);
    }
    const size = info.cell_px / info.width;   // OpenSeadragon viewport units: the image width is 1
    return [svg, new window.OpenSeadragon.Rect(0, 0, w * size, h * size)];
  }

  async function fillOverlays() {
    const options = [el("option", {value: ""}, "no overlay")];
    try {
      const {buckets} = await api("/buckets");
      for (const b of buckets.filter((b) => !b.system)) options.push(el("option", {value: `bucket:${b.bucket_id}`}, `bucket: ${b.name}`));
    } catch { /* buckets may be unavailable for this token */ }
    try {
      const {tags} = await api("/tags?limit=30");
      for (const t of tags) options.push(el("option", {value: `tag:${t.tag}`}, `tag: ${t.tag}`));
    } catch { /* no tags yet */ }
    options.push(el("option", {value: "date"}, "capture date"));
    overlaySelect.replaceChildren(...options);
  }

  // -- selection: a rectangle or a lasso (buttons, or shift-drag for a lasso) -------------------
  let tool = null, selectionMarks = [];
  const tools = {rect: root.querySelector("#map-rect"), lasso: root.querySelector("#map-lasso")};
  function setTool(next) {
    tool = tool === next ? null : next;
    for (const [name, button] of Object.entries(tools)) button.classList.toggle("active", tool === name);
    viewer.setMouseNavEnabled(!tool);
    box.classList.toggle("selecting", !!tool);
  }
  for (const [name, button] of Object.entries(tools)) button.addEventListener("click", () => setTool(name));
  box.style.position = "relative";

  function toCells(points) {
    return points.map(([x, y]) => {
      const p = viewer.viewport.viewerElementToImageCoordinates(new window.OpenSeadragon.Point(x, y));
      return [p.x / info.cell_px, p.y / info.cell_px];
    });
  }

  async function selectPolygon(points) {
    const t0 = performance.now();
    const body = await api(`/grid/${box.dataset.layoutId}/select`, {method: "POST", json: {polygon: toCells(points)}});
    for (const mark of selectionMarks) viewer.removeOverlay(mark);
    const [layer, where] = cellLayer(body.cells, {stroke: "#f5a623", fill: "#f5a62344", cls: "selected-cell"});
    viewer.addOverlay(layer, where);
    selectionMarks = [layer];
    if (body.image_ids.length) selectIds(body.image_ids); else clearSelection();
    status.textContent = `${body.image_ids.length} images selected${body.truncated ? " (the first 100000)" : ""}`;
    box.dataset.selected = String(body.image_ids.length);
    performance.mark("map-selection-shown");  // read by tests/bench/bench_dashboard.py
    box.dataset.selectMs = String(Math.round(performance.now() - t0));
  }

  box.addEventListener("pointerdown", (e) => {
    const kind = tool || (e.shiftKey ? "lasso" : null);
    if (!kind || !info || e.button !== 0) return;
    e.preventDefault();
    e.stopPropagation();
    const origin = box.getBoundingClientRect();
    const at = (ev) => [ev.clientX - origin.left, ev.clientY - origin.top];
    const start = at(e);
    let points = [start];
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "map-lasso");
    const shape = document.createElementNS(SVG, "polygon");
    svg.append(shape);
    box.append(svg);
    const draw = () => shape.setAttribute("points", points.map((p) => p.join(",")).join(" "));
    const move = (m) => {
      const p = at(m);
      if (kind === "rect") points = [start, [p[0], start[1]], p, [start[0], p[1]]];
      else {
        const last = points[points.length - 1];
        if (Math.hypot(p[0] - last[0], p[1] - last[1]) >= 4) points.push(p);
      }
      draw();
    };
    const up = () => {
      window.removeEventListener("pointermove", move, true);
      window.removeEventListener("pointerup", up, true);
      svg.remove();
      if (points.length >= 3) selectPolygon(points).catch((err) => toast(err.message, "error"));
    };
    window.addEventListener("pointermove", move, true);
    window.addEventListener("pointerup", up, true);
  }, true);

  select.addEventListener("change", () => {  // another layout: its cells differ, so the overlay starts over
    overlaySelect.value = "";
    dates.hide();
    open(select.value);
  });
  overlaySelect.addEventListener("change", () => overlay(overlaySelect.value).catch((e) => toast(e.message, "error")));
  await open(layouts[0].layout_id);
  fillOverlays();
}
