// SQL panel: POST the query to the API and show the rows as a table (text nodes only, never HTML).
const form = document.getElementById("sql-form");
const text = document.getElementById("sql-text");
const status = document.getElementById("sql-status");
const result = document.getElementById("sql-result");

function cell(tag, value) {
  const el = document.createElement(tag);
  el.textContent = value === null ? "∅" : typeof value === "object" ? JSON.stringify(value) : String(value);
  return el;
}

async function run(event) {
  event.preventDefault();
  status.textContent = "running…";
  status.className = "";
  result.replaceChildren();
  const response = await fetch("/api/v1/sql", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sql: text.value}),
  });
  const body = await response.json();
  if (!body.ok) {
    status.textContent = body.error;
    status.className = "error";
    return;
  }
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  body.columns.forEach((c) => head.appendChild(cell("th", c)));
  const tbody = table.createTBody();
  body.rows.forEach((row) => {
    const tr = tbody.insertRow();
    row.forEach((v) => tr.appendChild(cell("td", v)));
  });
  result.appendChild(table);
  status.textContent = `${body.rows.length} rows${body.truncated ? " (truncated)" : ""} in ${body.elapsed_ms.toFixed(1)} ms`;
}

form.addEventListener("submit", run);
