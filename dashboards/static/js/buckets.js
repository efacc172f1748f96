// Buckets: the list (#buckets) and one bucket's page (#buckets/<id>): members and pending images,
// paged; select members to move, copy, remove or discard them (the selection bar); the bucket's
// history from the log; export links (a manifest or a zip), now or as of a time.
import {api, el, thumbUrl, toast} from "./api.js";
import {selectable} from "./selection.js";

const PAGE = 56;  // 8 × 7

export function mountBuckets(root, {thumbLarge, openDetails}) {
  const head = root.querySelector("#bucket-head");
  const grid = root.querySelector("#bucket-members");
  const pager = root.querySelector("#bucket-pager");
  const pendingBox = root.querySelector("#bucket-pending");
  const historyBox = root.querySelector("#bucket-history");
  const doubtsBox = root.querySelector("#bucket-doubts");
  const listBox = root.querySelector("#bucket-index");
  let current = null;   // {bucket_id, name, ...}
  let offset = 0;
  let visible = true;   // mounted when first shown (the first view event came before this listener)
  selectable(grid, {from: () => current && {bucketId: current.bucket_id, name: current.name}});

  const cell = (id, extra = {}) => el("button", {type: "button", class: "cell", dataset: {imageId: id},
                                                 onclick: () => openDetails(id), ...extra},
    el("img", {loading: "lazy", alt: "bucket image", src: thumbUrl(id, thumbLarge)}));

  async function showList() {
    current = null;
    for (const part of [head, grid, pager, pendingBox, doubtsBox, historyBox]) part.replaceChildren();
    const {buckets} = await api("/buckets");
    listBox.hidden = false;
    listBox.replaceChildren(el("h2", {}, "Buckets"), el("table", {class: "result"},
      el("thead", {}, el("tr", {}, ["bucket", "members", "pending", "created by"].map((h) => el("th", {}, h)))),
      el("tbody", {}, buckets.map((b) => el("tr", {},
        el("td", {}, el("a", {href: `#buckets/${b.bucket_id}`, style: `border-left: 6px solid ${b.color || "#888"}; padding-left: .4rem`}, b.name)),
        el("td", {}, String(b.count)), el("td", {}, String(b.pending)), el("td", {}, b.created_by || ""))))));
  }

  function exportLinks(id) {
    const asOf = el("input", {type: "datetime-local", id: "bucket-as-of", step: 1, "aria-label": "as of (your local time)"});
    const links = el("span", {class: "export-links"});
    const draw = () => {
      const when = asOf.value ? `&as_of=${encodeURIComponent(new Date(asOf.value).toISOString())}` : "";
      links.replaceChildren(...["csv", "json", "parquet", "zip"].map((f) =>
        el("a", {href: `/api/v1/buckets/${id}/export?format=${f}${when}`, download: "", class: "export", dataset: {format: f}}, f)));
    };
    asOf.addEventListener("change", draw);
    draw();
    return el("div", {class: "bucket-export"}, "Export ", links, " · as of ", asOf, el("span", {class: "muted"}, " (empty: now)"));
  }

  async function showBucket(id, at = 0) {
    listBox.hidden = true;
    const t0 = performance.now();
    const body = await api(`/buckets/${id}?limit=${PAGE}&offset=${at}`);
    current = body.bucket;
    offset = at;
    const b = body.bucket;
    head.replaceChildren(
      el("h2", {style: `border-left: 8px solid ${b.color || "#888"}; padding-left: .5rem`, id: "bucket-title"},
         b.name, el("span", {class: "muted"}, ` · ${body.total} members · ${body.pending.length} pending`)),
      el("p", {class: "muted"}, "ctrl/shift-click or shift-drag to select members; the bar below moves, copies, removes or discards them."),
      exportLinks(id));
    grid.replaceChildren(...body.members.map((m) => cell(m)));
    if (!body.members.length) grid.append(el("p", {class: "empty"}, "No members yet."));
    performance.mark("bucket-page-shown");  // read by tests/bench/bench_dashboard.py
    root.dataset.shownMs = String(Math.round(performance.now() - t0));
    const last = Math.max(0, Math.ceil(body.total / PAGE) - 1);
    pager.replaceChildren(
      at > 0 ? el("button", {type: "button", id: "bucket-prev", onclick: () => showBucket(id, Math.max(0, at - PAGE))}, "← previous") : "",
      el("span", {id: "bucket-page-no"}, `page ${Math.floor(at / PAGE) + 1} of ${last + 1}`),
      at + PAGE < body.total ? el("button", {type: "button", id: "bucket-next", onclick: () => showBucket(id, at + PAGE)}, "next →") : "");
    pendingBox.replaceChildren(...(body.pending.length ? [
      el("h3", {}, `Pending review (${body.pending.length})`),
      el("p", {}, el("a", {href: "#curate", id: "bucket-review", onclick: () => sessionStorage.setItem("imagelake.active", id)},
                     "review them in Curate"), el("span", {class: "muted"}, " (fast-forward: x marks the wrong ones, then commit)")),
      el("div", {class: "grid"}, body.pending.slice(0, PAGE).map((p) => cell(p)))] : []));
    history(id);
    // the doubts are computed on the server (model fits over the bucket): asked for once this
    // page's thumbnails on screen are in, so they do not compete with them (at most 3 s later)
    imagesIn(grid, 3000).then(() => { if (current && current.bucket_id === id && offset === at) doubts(id); });
  }

  function imagesIn(box, capMs) {
    // the ones on screen (the others are lazy and may never load)
    const pending = [...box.querySelectorAll("img")].filter((i) => !i.complete && i.getBoundingClientRect().top < window.innerHeight)
      .map((i) => new Promise((resolve) => { i.addEventListener("load", resolve, {once: true}); i.addEventListener("error", resolve, {once: true}); }));
    return Promise.race([Promise.all(pending), new Promise((resolve) => setTimeout(resolve, capMs))]);
  }

  // Doubtful members (GET /buckets/<id>/doubts): each with remove and move (to the bucket its
  // neighbours are in, preselected)
  async function doubts(id) {
    const write = document.body.dataset.scope !== "read";
    try {
      const [body, {buckets}] = await Promise.all([api(`/buckets/${id}/doubts?n=12`), api("/buckets")]);
      if (!current || current.bucket_id !== id) return;
      const others = buckets.filter((b) => !b.system && b.bucket_id !== id);
      const name = (bid) => (buckets.find((b) => b.bucket_id === bid) || {}).name || bid;
      const act = async (imageId, kind, target) => {
        try {
          if (kind === "remove") await api(`/buckets/${id}/images/${imageId}`, {method: "DELETE"});
          else await api(`/buckets/${target}/images`, {method: "POST", json: {image_ids: [imageId], from: id, mode: "move"}});
          toast(kind === "remove" ? `removed from "${current.name}"` : `moved to "${name(target)}"`);
          document.dispatchEvent(new CustomEvent("imagelake:buckets-changed", {detail: {kind, bucketId: target || id, ids: [imageId]}}));
        } catch (e) { toast(e.message, "error"); }
      };
      const item = (d) => {
        const choose = el("select", {class: "doubt-target", "aria-label": "move to bucket"},
          others.map((b) => el("option", {value: b.bucket_id, selected: b.bucket_id === d.suggested_bucket}, b.name)));
        return el("div", {class: "doubt", dataset: {imageId: d.image_id}},
          el("button", {type: "button", class: "cell", dataset: {imageId: d.image_id}, onclick: () => openDetails(d.image_id),
                        title: `neighbours in this bucket ${Math.round(d.neighbours * 100)}%` +
                               (d.model == null ? "" : ` · model ${Math.round(d.model * 100)}%`)},
             el("img", {loading: "lazy", alt: "doubtful member", src: thumbUrl(d.image_id, thumbLarge)}),
             el("span", {class: "caption"}, `doubt ${d.score.toFixed(2)}`)),
          d.suggested_bucket ? el("span", {class: "muted suggested"}, `neighbours say: ${name(d.suggested_bucket)}`) : "",
          write ? el("span", {class: "actions"},
            el("button", {type: "button", class: "doubt-remove", onclick: () => act(d.image_id, "remove")}, "remove"),
            others.length ? [choose, el("button", {type: "button", class: "doubt-move",
                                                   onclick: () => act(d.image_id, "move", choose.value)}, "move")] : "") : "");
      };
      doubtsBox.replaceChildren(el("h3", {}, `Doubtful members · the ${body.results.length} most doubtful`),
        el("p", {class: "muted"}, "members whose nearest labelled neighbours and the bucket's model say they belong elsewhere, most doubtful first"),
        body.results.length ? el("div", {class: "doubts", id: "bucket-doubts-list"}, body.results.map(item))
                            : el("p", {class: "muted"}, "no doubtful members"));
    } catch (e) {
      doubtsBox.replaceChildren(el("h3", {}, "Doubtful members"),
        el("p", {class: "muted"}, e.status === 503 ? "not available yet (needs embeddings)" : e.message));
    }
  }

  async function history(id) {
    try {
      const body = await api(`/buckets/${id}/history`);
      const events = body.events.slice(-50).reverse();
      historyBox.replaceChildren(el("h3", {}, `History (${body.events.length} events, log version ${body.version})`),
        el("table", {class: "result", id: "bucket-history-table"},
          el("thead", {}, el("tr", {}, ["seq", "when", "who", "what", "images", ""].map((h) => el("th", {}, h)))),
          el("tbody", {}, events.map((e) => el("tr", {class: e.undone ? "undone" : ""},
            el("td", {}, String(e.seq)), el("td", {}, (e.at || "").replace("T", " ").slice(0, 19)),
            el("td", {}, e.actor_name || ""), el("td", {}, e.action + (e.from_bucket && e.from_bucket !== id ? " (from another bucket)" : "")
              + (e.from_bucket === id ? " (out of this bucket)" : "")),
            el("td", {}, String((e.image_ids || []).length + (e.rejected_ids || []).length)),
            el("td", {}, e.undone ? "undone" : ""))))));
    } catch (e) { historyBox.replaceChildren(el("p", {class: "muted"}, e.message)); }
  }

  async function show(arg) {
    try {
      if (arg) await showBucket(arg, 0); else await showList();
    } catch (e) { toast(e.message, "error"); }
  }

  document.addEventListener("imagelake:view", (e) => { visible = e.detail === "buckets"; });
  for (const name of ["imagelake:buckets-changed", "imagelake:undone"]) {
    document.addEventListener(name, () => { if (visible && current) showBucket(current.bucket_id, offset); });
  }
  return {route: show};
}
