// A small SVG chart for query results: bars for category → number, lines when the first column is
// a time or a number series. Hand-written (≈100 lines) rather than a charting library: it only has
// to draw what a query returns, and it stays dependency-free.

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fb3", "#e07b39", "#3a9b5c", "#b8439a", "#8a6d3b", "#5a5a9e"];

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

const NUMERIC = /^(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT|UTINYINT|USMALLINT|UINTEGER|UBIGINT|FLOAT|DOUBLE|DECIMAL.*|REAL)$/i;
const TEMPORAL = /^(DATE|TIMESTAMP.*|TIME.*)$/i;

// Which columns to plot: x is the first column; y are the numeric columns after it.
export function chartable(result) {
  if (!result.rows.length || result.columns.length < 2) return null;
  const ys = result.types.map((t, i) => (i > 0 && NUMERIC.test(t) ? i : -1)).filter((i) => i > 0);
  if (!ys.length) return null;
  const kind = TEMPORAL.test(result.types[0]) || (NUMERIC.test(result.types[0]) && result.rows.length > 12) ? "line" : "bar";
  return {kind, x: 0, ys};
}

export function drawChart(result, {width = 640, height = 260} = {}) {
  const plan = chartable(result);
  if (!plan) return null;
  const rows = result.rows.slice(0, plan.kind === "bar" ? 40 : 2000);
  const pad = {l: 56, r: 12, t: 12, b: plan.kind === "bar" ? 70 : 36};
  const w = width - pad.l - pad.r, h = height - pad.t - pad.b;
  const values = rows.flatMap((r) => plan.ys.map((i) => Number(r[i]) || 0));
  const max = Math.max(1e-9, ...values), min = Math.min(0, ...values);
  const y = (v) => pad.t + h - ((v - min) / (max - min)) * h;
  const root = svg("svg", {viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
                           "aria-label": `${plan.kind} chart of ${result.columns[plan.ys[0]]} by ${result.columns[0]}`});
  root.append(svg("line", {x1: pad.l, x2: pad.l + w, y1: y(0), y2: y(0), class: "axis"}));
  for (let k = 0; k <= 4; k++) {
    const v = min + ((max - min) * k) / 4;
    root.append(svg("text", {x: pad.l - 6, y: y(v) + 4, "text-anchor": "end", class: "tick"}, Number(v.toPrecision(3)).toLocaleString()));
    root.append(svg("line", {x1: pad.l, x2: pad.l + w, y1: y(v), y2: y(v), class: "grid"}));
  }
  if (plan.kind === "bar") {
    const band = w / rows.length, bw = Math.max(1, (band * 0.8) / plan.ys.length);
    rows.forEach((r, j) => {
      plan.ys.forEach((i, s) => {
        const v = Number(r[i]) || 0;
        const bar = svg("rect", {x: pad.l + j * band + band * 0.1 + s * bw, y: Math.min(y(v), y(0)), width: bw,
                                 height: Math.abs(y(0) - y(v)), fill: COLORS[s % COLORS.length], class: "bar"});
        bar.append(svg("title", {}, `${r[0]}: ${v}`));
        root.append(bar);
      });
      const label = String(r[0] ?? "∅").slice(0, 14);
      root.append(svg("text", {x: pad.l + j * band + band / 2, y: pad.t + h + 12, class: "tick",
                               transform: `rotate(35 ${pad.l + j * band + band / 2} ${pad.t + h + 12})`}, label));
    });
  } else {
    const xs = rows.map((r) => (TEMPORAL.test(result.types[0]) ? Date.parse(r[0]) : Number(r[0])));
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const x = (v) => pad.l + (x1 === x0 ? w / 2 : ((v - x0) / (x1 - x0)) * w);
    plan.ys.forEach((i, s) => {
      const points = rows.map((r, j) => `${x(xs[j]).toFixed(1)},${y(Number(r[i]) || 0).toFixed(1)}`).join(" ");
      root.append(svg("polyline", {points, fill: "none", stroke: COLORS[s % COLORS.length], "stroke-width": 2, class: "line"}));
    });
    [rows[0][0], rows[rows.length - 1][0]].forEach((v, k) =>
      root.append(svg("text", {x: k ? pad.l + w : pad.l, y: pad.t + h + 16, "text-anchor": k ? "end" : "start", class: "tick"}, String(v))));
  }
  const legend = svg("g", {class: "legend"});
  plan.ys.forEach((i, s) => legend.append(svg("text", {x: pad.l + 8 + s * 120, y: pad.t + 10, fill: COLORS[s % COLORS.length]}, result.columns[i])));
  root.append(legend);
  return root;
}
