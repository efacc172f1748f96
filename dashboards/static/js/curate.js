// Curation: the bucket bar, grid mode (a page of suggestions) and Tetris mode (one image at a time).
// Keys: 1–9 drop the focused image into bucket N, x discards it, u undoes your last action,
// arrows move the focus, n shows the next page, f fast-forwards, t switches Grid/Tetris.
import {api, el, thumbUrl, toast} from "./api.js";
import {keysHelp} from "./keys.js";
import {clearSelection, selectable, selectionIds} from "./selection.js";
import {describe, redoLast, undoLast} from "./undo.js";
import {expandStack, idsOf, mountStackToggle, stackSuggestions} from "./stacks.js";

const PAGE = 28;          // 4 × 7
const PALETTE = ["#2f6fb3", "#e07b39", "#3a9b5c", "#b8439a", "#8a6d3b", "#d64550", "#5a5a9e", "#1b998b", "#c9a227"];

export function mountCurate(root, {thumbSmall, thumbLarge, openDetails, scope}) {
  const bar = root.querySelector("#bucket-bar");
  const gridBox = root.querySelector("#curate-grid");
  const tetrisBox = root.querySelector("#curate-tetris");
  const status = root.querySelector("#curate-status");
  const reviewBar = root.querySelector("#curate-review");
  const canWrite = scope !== "read";
  let buckets = [];
  let previews = {};          // bucket id -> its most typical members (GET /bucket-previews)
  let active = null;          // bucket id suggestions are for
  let mode = "grid";
  let page = [];              // [{image_id, score, source, placed: bucket_id|null}]
  let focus = 0;
  let prefetched = null;      // the next page, fetched while the curator works on this one
  let review = null;          // fast-forward: pending image ids under review
  let tetrisItem = null;
  let visible = true;
  const inflight = new Set();  // placements sent and not answered yet: n waits for them
  const failed = new Set();    // placements the server refused: neither accepted nor rejected
  let turning = false;         // n in progress (feedback, then the next page)
  let meta = null;             // the last suggestions answer: acceptance, positives

  const say = (text) => { status.textContent = text; };
  const byKey = (n) => buckets.filter((b) => !b.system)[n - 1];
  const colorOf = (id) => (buckets.find((b) => b.bucket_id === id) || {}).color || "#888";

  async function loadBuckets(withPreviews = true) {
    const body = await api("/buckets");
    buckets = body.buckets;
    const user = buckets.filter((b) => !b.system);
    // the active bucket survives a reload (this tab), so does a review under way in it
    if (active === null) active = sessionStorage.getItem("imagelake.active");
    if (!user.some((b) => b.bucket_id === active)) active = user.length ? user[0].bucket_id : null;
    if (active) sessionStorage.setItem("imagelake.active", active);
    renderBar();
    if (withPreviews) loadPreviews();
  }

  // one bucket's row as a write answered it: the bar shows its new count at once
  // (answers to two quick adds may come back out of order: the later event's row wins)
  const rowSeq = {};
  function setRow(row, seq) {
    const i = row ? buckets.findIndex((b) => b.bucket_id === row.bucket_id) : -1;
    if (i < 0) return false;
    if (seq != null && seq < (rowSeq[row.bucket_id] ?? -1)) return true;
    if (seq != null) rowSeq[row.bucket_id] = seq;
    buckets[i] = row;
    renderBar();
    return true;
  }

  // the bar's typical members follow a run of placements once it pauses, not one request per key
  let previewTimer = null;
  function previewsSoon() {
    clearTimeout(previewTimer);
    previewTimer = setTimeout(loadPreviews, 1500);
  }

  // The bar's thumbnails come after the suggestions: they are not on the path of the first page.
  async function loadPreviews() {
    try {
      previews = (await api("/bucket-previews?n=4")).previews;
      renderBar();
    } catch (e) { /* the bar works without them */ }
  }

  // The bar is re-rendered whenever counts or previews arrive; the new-bucket form is made once
  // and kept outside the re-rendered list, so a name being typed (and the input's focus) survives.
  const list = el("div", {class: "bucket-list"});
  const newBucket = canWrite ? el("form", {class: "new-bucket", onsubmit: createBucket},
    el("input", {name: "name", placeholder: "new bucket", "aria-label": "new bucket name", maxlength: 200, required: true}),
    el("button", {type: "submit"}, "+")) : null;
  bar.replaceChildren(list, ...(newBucket ? [newBucket] : []));

  function renderBar() {
    const user = buckets.filter((b) => !b.system);
    list.replaceChildren(
      ...user.map((b, i) => {
        const node = el("div", {class: `bucket${b.bucket_id === active ? " active" : ""}`, style: `--bucket:${b.color || PALETTE[i % PALETTE.length]}`,
                                dataset: {bucketId: b.bucket_id}, tabindex: 0, role: "button",
                                onclick: () => { if (active !== b.bucket_id) { active = b.bucket_id; sessionStorage.setItem("imagelake.active", active); renderBar(); refresh(); } }},
          i < 9 ? el("kbd", {class: "key"}, String(i + 1)) : "",
          el("div", {class: "name"}, b.name),
          el("div", {class: "count"}, `${b.count} images${b.pending ? ` · ${b.pending} pending` : ""}`),
          (previews[b.bucket_id] || []).length ? el("div", {class: "preview"}, ...previews[b.bucket_id].map((id) =>
            el("img", {src: thumbUrl(id, thumbSmall), alt: "", title: "a typical member (double-click for details)",
                       dataset: {imageId: id}, ondblclick: (e) => { e.stopPropagation(); openDetails(id); }}))) : "",
          canWrite ? el("div", {class: "bucket-tools"},
            el("button", {type: "button", class: "link", title: "rename", onclick: (e) => { e.stopPropagation(); rename(b); }}, "rename"), " ",
            el("input", {type: "color", value: b.color || PALETTE[i % PALETTE.length], title: "recolor", "aria-label": `color of ${b.name}`,
                         onclick: (e) => e.stopPropagation(), onchange: (e) => recolor(b, e.target.value)}), " ",
            el("button", {type: "button", class: "link", title: "delete", onclick: (e) => { e.stopPropagation(); remove(b); }}, "delete")) : "");
        node.addEventListener("dragover", (e) => { e.preventDefault(); node.classList.add("drop"); });
        node.addEventListener("dragleave", () => node.classList.remove("drop"));
        node.addEventListener("drop", (e) => {
          e.preventDefault();
          node.classList.remove("drop");
          const id = e.dataTransfer.getData("text/x-image-id");
          if (id) place(id, b.bucket_id);
        });
        return node;
      }));
  }

  async function createBucket(event) {
    event.preventDefault();
    const form = event.target, input = form.elements.name, button = form.querySelector("button");
    if (button.disabled) return;  // one bucket per press, however fast the clicks come
    const color = PALETTE[buckets.filter((b) => !b.system).length % PALETTE.length];
    button.disabled = true;
    try {
      const body = await api("/buckets", {method: "POST", json: {name: input.value.trim(), color}});
      input.value = "";
      active = body.bucket.bucket_id;
      await loadBuckets();
      refresh();
    } catch (e) { toast(e.message, "error"); } finally { button.disabled = false; }
  }

  // rename in place: the name becomes a field (Enter saves, Escape cancels); no native dialog
  function rename(b) {
    const node = list.querySelector(`[data-bucket-id="${b.bucket_id}"] .name`);
    if (!node) return;
    const input = el("input", {class: "rename", value: b.name, "aria-label": `new name of ${b.name}`, maxlength: 200});
    const done = async (save) => {
      if (!input.isConnected) return;
      const name = input.value.trim();
      if (save && name && name !== b.name) {
        try { await api(`/buckets/${b.bucket_id}`, {method: "PATCH", json: {name}}); } catch (e) { toast(e.message, "error"); }
      }
      await loadBuckets();
    };
    input.addEventListener("keydown", (e) => {
      e.stopPropagation();
      if (e.key === "Enter") done(true);
      else if (e.key === "Escape") done(false);
    });
    input.addEventListener("click", (e) => e.stopPropagation());
    input.addEventListener("blur", () => done(true));
    node.replaceWith(input);
    input.focus();
    input.select();
  }

  async function recolor(b, color) {
    try { await api(`/buckets/${b.bucket_id}`, {method: "PATCH", json: {color}}); await loadBuckets(); } catch (e) { toast(e.message, "error"); }
  }

  // delete at once, no native dialog: the delete is soft and u (or the status line's undo) brings it back
  async function remove(b) {
    try {
      await api(`/buckets/${b.bucket_id}`, {method: "DELETE"});
      await loadBuckets();
      await refresh();
      say(`deleted "${b.name}" — press u to undo`);
    } catch (e) { toast(e.message, "error"); }
  }

  // -- actions on images -----------------------------------------------------------------

  // A placement shows at once (the badge), before the server answers, so a fast `n` never counts
  // the image as rejected; a failed write takes the badge back and says why.
  async function place(imageId, bucketId) {
    if (!canWrite) return toast("this token may only look (read scope)", "error");
    const before = placedOf(imageId);
    if (before === bucketId) return;
    const tetris = mode === "tetris";  // the next Tetris card must come after the write
    if (!tetris) mark(imageId, bucketId);
    // a second key on a placed image moves it: an image sits in one bucket of this page at a time
    const ids = idsOf(page, imageId);  // a near-duplicate stack: its whole group
    const json = before ? {image_ids: ids, from: before, mode: "move"} : {image_ids: ids};
    await track(imageId, (async () => {
      try {
        const body = await api(`/buckets/${bucketId}/images`, {method: "POST", json});
        if (tetris) mark(imageId, bucketId);
        // an add changes one bucket: its count comes with the answer (no second request); a move
        // changes two, and the bar is asked again
        if (before || !setRow(body.bucket, body.event.seq)) loadBuckets(false);
        previewsSoon();
      } catch (e) { unmark(imageId, before); failed.add(imageId); toast(e.message, "error"); }
    })());
  }

  // every write on an image of the page is tracked until it is answered
  async function track(imageId, promise) {
    failed.delete(imageId);
    inflight.add(promise);
    try { await promise; } finally { inflight.delete(promise); }
  }

  async function discard(imageId) {
    if (!canWrite) return;
    const before = placedOf(imageId);
    if (before === "discard") return;
    const tetris = mode === "tetris";
    if (!tetris) mark(imageId, "discard");
    await track(imageId, (async () => {
      try {
        const ids = idsOf(page, imageId);
        await api("/discard", {method: "POST", json: before ? {image_ids: ids, from: before} : {image_ids: ids}});
        if (tetris) mark(imageId, "discard");
        if (before) loadBuckets();
      } catch (e) { unmark(imageId, before); failed.add(imageId); toast(e.message, "error"); }
    })());
  }

  const placedOf = (imageId) => (page.find((p) => p.image_id === imageId) || {}).placed || null;

  function unmark(imageId, previous) {
    const item = page.find((p) => p.image_id === imageId);
    if (item) item.placed = previous;
    if (mode === "grid") renderGrid();
  }

  // an undo from anywhere (u here, the header's button, ctrl+Z): the badges and the review follow
  document.addEventListener("imagelake:undone", async (e) => {
    const undone = e.detail || {};
    await loadBuckets(false);
    say(`undone: ${describe(undone)}`);
    const ids = new Set(undone.image_ids || []);
    const back = undone.action === "move" ? (undone.from_bucket || null) : null;
    for (const item of page) if (ids.has(item.image_id)) item.placed = back;
    // an undone fast-forward takes its pending images away; an undone commit brings them back
    if (mode === "grid") { await resumeReview(); renderGrid(); } else nextTetris();
    loadPreviews();
  });

  function mark(imageId, bucketId) {
    const item = page.find((p) => p.image_id === imageId);
    if (item) item.placed = bucketId;
    if (mode === "grid") renderGrid();
    else if (tetrisItem && tetrisItem.image_id === imageId) flyTo(bucketId);
  }

  // -- grid mode ---------------------------------------------------------------------------

  async function fetchPage(n) {
    if (!active) return [];
    const body = await api(`/buckets/${active}/suggestions?n=${n}`);
    meta = body;
    return (await stackSuggestions(body.suggestions)).map((s) => ({...s, placed: null}));
  }

  // The next page's thumbnails are fetched only once the visible page's have arrived, so the two
  // pages do not share the connection pool while the curator waits for the first.
  async function preload(items) {
    const visibleImgs = [...gridBox.querySelectorAll("img")];
    await Promise.all(visibleImgs.map((img) => img.complete ? null : new Promise((ok) => {
      img.addEventListener("load", ok, {once: true});
      img.addEventListener("error", ok, {once: true});
    })));
    for (const it of items) {
      const img = new Image();
      img.fetchPriority = "low";
      img.src = thumbUrl(it.image_id, thumbLarge);
    }
  }

  async function refresh() {
    review = null;
    if (mode === "tetris") return nextTetris();
    if (!active) {
      gridBox.replaceChildren(el("p", {class: "empty"}, canWrite ? "Create a bucket to start: type a name above and press +." : "No buckets yet."));
      return;
    }
    say("loading suggestions…");
    const items = await fetchPage(PAGE * 2);
    page = items.slice(0, PAGE);
    prefetched = items.slice(PAGE);
    focus = 0;
    if (await resumeReview()) {
      renderGrid();
      return say(`${review.length} pending images to review; the suggestions come back after the commit`);
    }
    renderGrid();
    if (page.length) performance.mark("curate-grid-shown");  // read by tests/bench/bench_dashboard.py
    preload(prefetched);
    say(page.length ? `${page.length} suggestions for ${(buckets.find((b) => b.bucket_id === active) || {}).name} · ${progress()}`
                    : "no suggestions: add images with features to the bucket");
  }

  // how the search is going, in words: members found, recent acceptance, confident candidates left
  function progress() {
    const row = buckets.find((b) => b.bucket_id === active) || {};
    const parts = [`found ${row.count ?? 0}`];
    if (meta && meta.acceptance != null) parts.push(`${Math.round(100 * meta.acceptance)}% of recent pages accepted`);
    const confident = page.filter((p) => p.source === "model" && Number(p.score) > 0).length;
    if (meta && meta.positives && confident < 7) parts.push("few confident candidates left");
    return parts.join(" · ");
  }

  // scores are logits; a person reads a share
  const confidence = (score) => `${Math.round(100 / (1 + Math.exp(-Number(score))))}%`;

  function renderGrid() {
    const items = review ? review.map((id) => ({image_id: id, placed: review.removed?.has(id) ? "discard" : active, source: "pending"})) : page;
    gridBox.replaceChildren(...items.map((it, i) => {
      const node = el("button", {type: "button", class: `cell${i === focus ? " focused" : ""}${it.stack ? " stack" : ""}`, draggable: "true",
                                 title: it.score != null ? `${it.source} · confidence ${confidence(it.score)}` : it.source,
                                 dataset: {imageId: it.image_id, index: i},
                                 onclick: () => { focus = i; renderGrid(); },
                                 ondblclick: () => openDetails(it.image_id)},
        el("img", {alt: "suggested image", src: thumbUrl(it.image_id, thumbLarge)}),
        it.stack ? el("span", {class: "stack-count", title: "near-duplicates: a key sorts them all, e expands"}, `×${it.stack.size}`) : "",
        it.placed ? el("span", {class: "badge", style: `--bucket:${it.placed === "discard" ? "#444" : colorOf(it.placed)}`},
                       it.placed === "discard" ? "discarded" : (buckets.find((b) => b.bucket_id === it.placed) || {}).name || "") : "");
      node.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/x-image-id", it.image_id));
      return node;
    }));
    fitGrid();
    const focused = gridBox.querySelector(".cell.focused");
    if (focused && visible && mode === "grid") focused.scrollIntoView({block: "nearest"});  // keys act on what is seen
    reviewBar.hidden = !review;
    if (review) {
      const name = (buckets.find((b) => b.bucket_id === active) || {}).name;
      reviewBar.replaceChildren(
        `Reviewing ${review.length} pending image${review.length === 1 ? "" : "s"} of "${name}" (fast-forward): `,
        `${review.removed.size} marked as not belonging. Press x on the wrong ones, then `,
        el("button", {type: "button", id: "review-commit", onclick: commitReview}, "commit"));
    }
  }

  // The grid is sized to the window: four rows of seven fit under the bar, whatever the viewport
  // (1366×768 included), so no cell the keys act on is below the fold.
  function fitGrid() {
    if (gridBox.hidden || !visible) return;
    const top = gridBox.getBoundingClientRect().top + window.scrollY;
    const room = window.innerHeight - top - 40;  // the keys line below
    const rows = Math.max(1, Math.ceil(gridBox.children.length / 7));
    gridBox.style.maxWidth = `${Math.max(420, Math.floor((room - 6 * (rows - 1)) / Math.min(rows, 4) * 7 + 36))}px`;
  }
  window.addEventListener("resize", () => fitGrid());

  // The bucket's pending images are the review, whoever made them and whenever: after a reload,
  // an undo of a commit, or a fast-forward by another curator. Marks survive a reload (this tab).
  const reviewKey = () => `imagelake.review.${active}`;
  async function resumeReview() {
    const row = buckets.find((b) => b.bucket_id === active);
    if (!row || !row.pending) { review = null; return false; }
    const body = await api(`/buckets/${active}?limit=1`);
    if (!body.pending.length) { review = null; return false; }
    const saved = new Set(JSON.parse(sessionStorage.getItem(reviewKey()) || "[]"));
    review = body.pending.slice();
    review.removed = new Set(review.filter((id) => saved.has(id)));
    focus = Math.min(focus, review.length - 1);
    return true;
  }

  function toggleReviewMark(id) {
    review.removed.has(id) ? review.removed.delete(id) : review.removed.add(id);
    sessionStorage.setItem(reviewKey(), JSON.stringify([...review.removed]));
    renderGrid();
  }

  // n: page 1's feedback is committed before page 2 is asked for, so page 2 reflects it; a drop
  // still on its way is waited for first (it must not be counted as a rejection, nor lost).
  async function nextPage() {
    if (!active || review || turning) return;
    turning = true;
    const startedOn = active;
    say("sending feedback…");
    try {
      if (inflight.size) await Promise.allSettled([...inflight]);
      const accepted = page.filter((p) => p.placed === active).map((p) => p.image_id);
      const rejected = page.filter((p) => !p.placed && !failed.has(p.image_id)).map((p) => p.image_id);
      // the accepted ones are members already (each drop was an add); they are named again so the
      // bucket's acceptance (which sets how much the suggester explores) counts them. (The next
      // page in the feedback's own answer, one round trip, was tried and measured slower in the
      // browser at 70k under load; see bench_dashboard in the README.)
      if (canWrite && (rejected.length || accepted.length)) {
        const body = await api(`/buckets/${active}/feedback`, {method: "POST", json: {accepted, rejected}});
        setRow(body.bucket, body.event.seq);
      }
      if (active !== startedOn) return;
      const shown = new Set(page.map((p) => p.image_id));
      const fresh = (await fetchPage(PAGE * 2)).filter((p) => !shown.has(p.image_id));
      page = fresh.slice(0, PAGE);
      prefetched = fresh.slice(PAGE);
      failed.clear();
      focus = 0;
      renderGrid();
      if (page.length) performance.mark("curate-next-shown");  // read by tests/bench/bench_dashboard.py
      preload(prefetched);
      say(`feedback sent: ${accepted.length} accepted, ${rejected.length} rejected · ${page.length} new suggestions · ${progress()}`);
    } catch (e) { toast(e.message, "error"); say("the feedback was not sent; press n to try again"); }
    finally { turning = false; }
  }

  async function fastForward() {
    if (!active || !canWrite) return;
    try {
      await api(`/buckets/${active}/fast-forward`, {method: "POST", json: {n: PAGE}});
      focus = 0;
      await loadBuckets();
      await resumeReview();
      renderGrid();
    } catch (e) { toast(e.message, "error"); }
  }

  async function commitReview() {
    const keep = review.filter((id) => !review.removed.has(id));
    const remove = review.filter((id) => review.removed.has(id));
    try {
      await api(`/buckets/${active}/fast-forward/commit`, {method: "POST", json: {keep, remove}});
      sessionStorage.removeItem(reviewKey());
      review = null;
      await loadBuckets();
      await refresh();
      say(`fast-forward committed: ${keep.length} kept, ${remove.length} removed`);
    } catch (e) { toast(e.message, "error"); }
  }

  // -- tetris mode -------------------------------------------------------------------------

  async function nextTetris() {
    tetrisBox.replaceChildren(el("p", {class: "muted"}, "finding the next image…"));
    const body = await api("/tetris/next");
    if (!body.image_id) {
      tetrisItem = null;
      tetrisBox.replaceChildren(el("p", {class: "empty"}, body.reason || "nothing to sort"));
      return;
    }
    tetrisItem = {image_id: body.image_id, bucket: body.bucket, score: body.score};
    page = [{image_id: body.image_id, placed: null}];
    for (const node of bar.querySelectorAll(".bucket")) node.classList.toggle("active", node.dataset.bucketId === body.bucket.bucket_id);
    const img = el("img", {class: "falling", alt: "image to sort", draggable: "true", src: thumbUrl(body.image_id, thumbLarge),
                           dataset: {imageId: body.image_id}, ondblclick: () => openDetails(body.image_id)});
    img.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/x-image-id", body.image_id));
    tetrisBox.replaceChildren(img, el("p", {class: "suggested"}, "suggested: ",
      el("strong", {style: `color:${body.bucket.color || "#333"}`}, body.bucket.name), " — Enter accepts, 1–9 picks another bucket, x discards"));
  }

  function flyTo(bucketId) {
    const target = bar.querySelector(`[data-bucket-id="${bucketId}"]`);
    const img = tetrisBox.querySelector(".falling");
    if (target && img) {
      const a = img.getBoundingClientRect(), b = target.getBoundingClientRect();
      img.style.transform = `translate(${b.left - a.left}px, ${b.top - a.top}px) scale(0.2)`;
    }
    setTimeout(nextTetris, 350);
  }

  // -- keys and modes ----------------------------------------------------------------------

  function setMode(next) {
    mode = next;
    root.querySelector("#mode-grid").classList.toggle("active", mode === "grid");
    root.querySelector("#mode-tetris").classList.toggle("active", mode === "tetris");
    gridBox.hidden = mode !== "grid";
    tetrisBox.hidden = mode !== "tetris";
    if (mode === "tetris") reviewBar.hidden = true;
    refresh();
  }

  function focusedId() {
    if (mode === "tetris") return tetrisItem && tetrisItem.image_id;
    const items = review || page.map((p) => p.image_id);
    const it = items[focus];
    return typeof it === "string" ? it : it && it.image_id;
  }

  document.addEventListener("keydown", (e) => {
    if (!visible || e.target.closest("input, textarea, select") || e.ctrlKey || e.metaKey || e.altKey) return;
    const id = focusedId();
    const cols = 7, count = review ? review.length : page.length;
    if (/^[1-9]$/.test(e.key) && mode === "grid" && !review && selectionIds().length) {
      const b = byKey(Number(e.key));  // a key with images selected drops them all
      const onPage = new Set(page.map((p) => p.image_id));
      if (b) { for (const sid of selectionIds()) if (onPage.has(sid)) place(sid, b.bucket_id); clearSelection(); }
    } else if (/^[1-9]$/.test(e.key)) {
      const b = byKey(Number(e.key));
      if (b && id) { place(id, b.bucket_id); if (mode === "grid") focus = Math.min(focus + 1, count - 1); }
    } else if (e.key === "x" && id) {
      if (review) toggleReviewMark(id);
      else discard(id);
    } else if (e.key === "Enter" && mode === "tetris" && tetrisItem) {
      place(tetrisItem.image_id, tetrisItem.bucket.bucket_id);
    } else if (e.key === "?") keysHelp();
    else if (e.key === "u") undoLast();
    else if (e.key === "U") redoLast();
    else if (e.key === "e" && mode === "grid" && !review) { page = expandStack(page, focus); renderGrid(); }
    else if (e.key === "n") nextPage();
    else if (e.key === "f") fastForward();
    else if (e.key === "t") setMode(mode === "grid" ? "tetris" : "grid");
    else if (e.key.startsWith("Arrow") && mode === "grid") {
      const step = {ArrowLeft: -1, ArrowRight: 1, ArrowUp: -cols, ArrowDown: cols}[e.key];
      focus = Math.max(0, Math.min(count - 1, focus + step));
      renderGrid();
    } else return;
    e.preventDefault();
  });
  document.addEventListener("imagelake:view", (e) => { visible = e.detail === "curate"; });
  // the selection bar acted on images of this page: the badges follow
  document.addEventListener("imagelake:buckets-changed", (e) => {
    const {kind, bucketId, ids} = e.detail;
    const to = kind === "discard" ? "discard" : kind === "remove" ? null : bucketId;
    for (const item of page) if (ids.includes(item.image_id)) item.placed = to;
    if (visible && mode === "grid") renderGrid();
    loadBuckets();
  });
  selectable(gridBox);
  root.querySelector("#mode-grid").addEventListener("click", () => setMode("grid"));
  root.querySelector("#mode-tetris").addEventListener("click", () => setMode("tetris"));
  mountStackToggle(root.querySelector(".curate-modes"), () => refresh());

  return loadBuckets(false).then(refresh).then(loadPreviews);
}
