// The map's overlay by capture date (GET /grid/<layout>/dates): the cells of the images taken
// between two years, each filled with its year's colour (oldest dark purple, newest yellow), a
// from/to year slider, and on request the images without a date, outlined in grey.
import {api, el} from "./api.js";

const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];  // viridis stops
const LIMIT = 20000;

export function yearColor(t) {
  const x = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1), i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
  const c = RAMP[i].map((v, k) => Math.round(v + (RAMP[i + 1][k] - v) * f));
  return `rgb(${c.join(",")})`;
}

const yearOfDay = (day) => new Date(day * 86400000).getUTCFullYear();

// bar: the date controls; cellLayer(cells, style) makes an SVG layer, setLayers(layers) puts them
// on the map in place of the overlay's previous ones; status: the map's status line
export function mountDateOverlay(bar, {cellLayer, setLayers, status, box}) {
  const from = bar.querySelector("#map-date-from"), to = bar.querySelector("#map-date-to");
  const fromOut = bar.querySelector("#map-date-from-year"), toOut = bar.querySelector("#map-date-to-year");
  const undated = bar.querySelector("#map-date-undated"), legend = bar.querySelector("#map-date-legend");
  let layoutId = null, seq = 0, timer = null, summary = null;

  async function draw() {
    const mine = ++seq;
    if (!summary.dated) {
      const none = undated.checked ? await api(`/grid/${layoutId}/dates?limit=${LIMIT}&undated=true`) : null;
      if (mine !== seq) return;
      setLayers(none ? [cellLayer(none.cells, {stroke: "#bbb", cls: "map-undated"})] : []);
      status.textContent = `no image on this map has a date taken · ${summary.undated.toLocaleString()} without a date`;
      box.dataset.dateCells = "0";
      return;
    }
    let a = Number(from.value), b = Number(to.value);
    if (a > b) [a, b] = [b, a];
    fromOut.textContent = String(a);
    toOut.textContent = String(b);
    legend.replaceChildren(el("span", {}, String(a)), el("span", {class: "ramp"}), el("span", {}, String(b)));
    const base = `/grid/${layoutId}/dates?limit=${LIMIT}`;
    const [inRange, none] = await Promise.all([
      api(`${base}&from=${a}&to=${b + 1}`),
      undated.checked ? api(`${base}&undated=true`) : Promise.resolve(null)]);
    if (mine !== seq) return;  // a newer slider position won
    const span = Math.max(b - a, 1);
    const layers = [cellLayer(inRange.cells, {cls: "map-date", fillOf: (c) => yearColor((yearOfDay(c.day) - a) / span)})];
    if (none) layers.push(cellLayer(none.cells, {stroke: "#bbb", cls: "map-undated"}));
    setLayers(layers);
    const years = a === b ? `in ${a}` : `${a}–${b}`;
    const shown = inRange.truncated ? ` (the first ${inRange.cells.length.toLocaleString()} drawn)` : "";
    status.textContent = `${inRange.count.toLocaleString()} cells taken ${years}${shown} · ` +
      `${summary.undated.toLocaleString()} without a date${none ? " (grey)" : ""}`;
    box.dataset.dateCells = String(inRange.cells.length);
  }

  const later = () => { clearTimeout(timer); timer = setTimeout(() => draw().catch(() => {}), 120); };
  from.addEventListener("input", later);
  to.addEventListener("input", later);
  undated.addEventListener("change", () => draw());

  return {
    async show(id) {
      layoutId = id;
      summary = await api(`/grid/${id}/dates?limit=1`);
      bar.hidden = false;
      if (!summary.dated) {
        for (const input of [from, to]) input.disabled = true;
        legend.replaceChildren();
      } else {
        const first = summary.years[0].year, last = summary.years[summary.years.length - 1].year;
        for (const input of [from, to]) Object.assign(input, {min: first, max: last, step: 1, disabled: false});
        from.value = String(first);
        to.value = String(last);
      }
      await draw();
    },
    hide() {
      seq++;
      clearTimeout(timer);
      bar.hidden = true;
      delete box.dataset.dateCells;
    },
  };
}
