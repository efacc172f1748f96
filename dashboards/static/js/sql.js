// SQL panel: a query box, preset panels, a results table (text nodes only) and a chart of the result.
import {api, el} from "./api.js";
import {drawChart} from "./chart.js";

export const PRESETS = {
  "Images per collection": "SELECT collection, count(*) AS images FROM images GROUP BY 1 ORDER BY 2 DESC",
  "Bucket sizes over time": `SELECT date_trunc('hour', "at") AS hour, count(*) FILTER (WHERE action IN ('add','copy','move')) AS added,
  count(*) FILTER (WHERE action = 'remove') AS removed FROM bucket_events GROUP BY 1 ORDER BY 1`,
  "Tag counts": "SELECT tag, count(*) AS images FROM tags GROUP BY 1 ORDER BY 2 DESC LIMIT 30",
  "Cluster sizes": "SELECT kind, cluster_id, count(*) AS images FROM clusters GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 30",
  "Job runs": `SELECT job, count(*) AS runs, sum(rows_out) AS rows_out,
  round(avg(epoch(ended_at) - epoch(started_at)), 1) AS avg_seconds, count(*) FILTER (WHERE state = 'failed') AS failed
FROM job_runs WHERE state <> 'running' GROUP BY 1 ORDER BY 1`,
  "Rejected inputs": "SELECT reason, count(*) AS files FROM rejects GROUP BY 1 ORDER BY 2 DESC",
};

function cell(tag, value) {
  return el(tag, {}, value === null ? "∅" : typeof value === "object" ? JSON.stringify(value) : String(value));
}

export function mountSql(root) {
  const text = root.querySelector("#sql-text");
  const status = root.querySelector("#sql-status");
  const table = root.querySelector("#sql-result");
  const chart = root.querySelector("#sql-chart");
  const presets = root.querySelector("#sql-presets");

  async function run(event) {
    event?.preventDefault();
    status.textContent = "running…";
    status.className = "";
    table.replaceChildren();
    chart.replaceChildren();
    let body;
    try {
      body = await api("/sql", {method: "POST", json: {sql: text.value}});
    } catch (e) {
      status.textContent = e.message;
      status.className = "error";
      return;
    }
    const grid = el("table", {class: "result"});
    const head = grid.createTHead().insertRow();
    body.columns.forEach((c) => head.append(cell("th", c)));
    const tbody = grid.createTBody();
    body.rows.slice(0, 1000).forEach((row) => {
      const tr = tbody.insertRow();
      row.forEach((v) => tr.append(cell("td", v)));
    });
    table.append(grid);
    const drawn = drawChart(body);
    if (drawn) chart.append(drawn);
    status.textContent = `${body.rows.length} rows${body.truncated ? " (truncated)" : ""} in ${body.elapsed_ms.toFixed(1)} ms`;
  }

  for (const [name, sql] of Object.entries(PRESETS)) {
    presets.append(el("button", {type: "button", class: "preset", onclick: () => { text.value = sql; run(); }}, name));
  }
  root.querySelector("#sql-form").addEventListener("submit", run);
  text.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(e); });
}
