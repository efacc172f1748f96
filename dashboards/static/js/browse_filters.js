// Browse's filter bar: folder, tag, bucket, cluster and capture fields (date taken, camera, has GPS)
// plus any filter of the filter language (JSON), from GET /browse/filters. Clusters show as cards
// (a preview thumbnail, the cluster's name and size); a click filters by it, again clears it.
// Every change calls onChange(); params() gives the query parameters of GET /images.
import {api, el, thumbUrl, toast} from "./api.js";

export function mountBrowseFilters(root, {thumbSize, onChange}) {
  const bar = root.querySelector("#browse-filters");
  const strip = root.querySelector("#browse-clusters");
  const state = {folder: "", tag: "", bucket: "", cluster: "", clusterName: "", from: "", to: "", camera: "", gps: false, where: "", stack: false};
  let choices = null;
  let clusterKind = "topic";

  const select = (id, label, options, key) => el("label", {}, label, " ",
    el("select", {id, "aria-label": label, onchange: (e) => set(key, e.target.value)},
      el("option", {value: ""}, "any"), ...options.map(([value, text]) => el("option", {value, selected: state[key] === value}, text))));

  function set(key, value) {
    state[key] = value;
    if (key === "cluster") state.clusterName = value ? (allClusters().find((c) => c.cluster_id === value) || {}).name || value : "";
    render();
    onChange();
  }

  const allClusters = () => choices ? [...choices.clusters.topic.clusters, ...choices.clusters.dup.clusters] : [];

  // folders are shown without the part every folder shares
  function folderLabels(folders) {
    const parts = folders.map((f) => f.folder.split("/"));
    let common = 0;
    while (parts.length > 1 && parts.every((p) => p.length > common + 1 && p[common] === parts[0][common])) common++;
    return folders.map((f, i) => [f.folder, `${parts[i].slice(common).join("/") || f.folder} (${f.images})`]);
  }

  function render() {
    if (!choices) return;
    const c = choices.capture;
    const date = (id, label, key) => el("label", {}, label, " ", el("input", {type: "date", id, value: state[key], "aria-label": label,
                                                                              onchange: (e) => set(key, e.target.value)}));
    bar.replaceChildren(
      select("filter-folder", "Folder", folderLabels(choices.folders), "folder"),
      el("label", {}, "Tag ", el("input", {id: "filter-tag", list: "filter-tags", value: state.tag, placeholder: "any", size: 12,
                                            "aria-label": "Tag", onchange: (e) => set("tag", e.target.value.trim())}),
         el("datalist", {id: "filter-tags"}, ...choices.tags.map((t) => el("option", {value: t.tag}, `${t.tag} (${t.images})`)))),
      select("filter-bucket", "Bucket", choices.buckets.map((b) => [b.bucket_id, `${b.name} (${b.images})`]), "bucket"),
      date("filter-from", "Taken from", "from"), date("filter-to", "to", "to"),
      c.cameras.length ? select("filter-camera", "Camera", c.cameras.map((x) => [x.camera, `${x.camera} (${x.images})`]), "camera") : "",
      el("label", {}, el("input", {type: "checkbox", id: "filter-gps", checked: state.gps, onchange: (e) => set("gps", e.target.checked)}),
         ` has GPS (${c.with_gps})`),
      el("label", {title: "show each near-duplicate group as one stack; e expands it, 1–9 sorts it into a bucket"},
         el("input", {type: "checkbox", id: "filter-stack", checked: state.stack, onchange: (e) => set("stack", e.target.checked)}),
         " stack near-duplicates"),
      el("label", {}, "Where ", el("input", {id: "filter-where", value: state.where, size: 28, spellcheck: "false",
                                              placeholder: '{"width": {">=": 100}}', "aria-label": "filter (JSON)",
                                              onchange: (e) => set("where", e.target.value.trim())})),
      active() ? el("button", {type: "button", id: "filter-clear", class: "link", onclick: clear}, "clear filters") : "");
    const list = choices.clusters[clusterKind].clusters;
    strip.replaceChildren(
      el("div", {class: "cluster-kinds"},
        el("button", {type: "button", class: clusterKind === "topic" ? "active" : "", onclick: () => { clusterKind = "topic"; render(); }}, "Topics"),
        el("button", {type: "button", class: clusterKind === "dup" ? "active" : "", onclick: () => { clusterKind = "dup"; render(); }}, "Near-duplicate groups")),
      ...(list.length ? list.map((k) => el("button", {type: "button", class: `cluster-card${state.cluster === k.cluster_id ? " active" : ""}`,
                                                       dataset: {clusterId: k.cluster_id}, title: `${k.name}: ${k.size} images`,
                                                       onclick: () => set("cluster", state.cluster === k.cluster_id ? "" : k.cluster_id)},
          k.preview.length ? el("img", {src: thumbUrl(k.preview[0], thumbSize), alt: "", loading: "lazy"}) : "",
          el("span", {class: "cluster-name"}, k.name), el("span", {class: "cluster-size"}, `${k.size} images`)))
        : [el("span", {class: "muted"}, "no clusters yet (imagelake cluster)")]));
  }

  function clear() {
    Object.assign(state, {folder: "", tag: "", bucket: "", cluster: "", clusterName: "", from: "", to: "", camera: "", gps: false, where: "", stack: false});
    render();
    onChange();
  }

  const active = () => Boolean(state.folder || state.tag || state.bucket || state.cluster || state.from || state.to ||
                               state.camera || state.gps || state.where);

  // the capture controls and the typed filter become one filter-language object
  function where() {
    const parts = [];
    const taken = {};
    if (state.from) taken[">="] = `${state.from}T00:00:00Z`;
    if (state.to) taken["<="] = `${state.to}T23:59:59Z`;
    if (Object.keys(taken).length) parts.push({taken_at: taken});
    if (state.camera) parts.push({camera: state.camera});
    if (state.gps) parts.push({has_gps: true});
    if (state.where) {
      try { parts.push(JSON.parse(state.where)); } catch { toast("the Where filter is not JSON, e.g. {\"width\": {\">=\": 100}}", "error"); }
    }
    return parts.length === 0 ? null : parts.length === 1 ? parts[0] : {$and: parts};
  }

  function params() {
    const out = {};
    for (const key of ["folder", "tag", "bucket", "cluster"]) if (state[key]) out[key] = state[key];
    if (state.stack && !state.cluster) out.stack = "dup";
    const w = where();
    if (w) out.where = JSON.stringify(w);
    return out;
  }

  // in words, for the title: "tag velvet · cluster golf ball (30)"
  function summary() {
    const bits = [];
    if (state.folder) bits.push(`folder ${state.folder.split("/").pop()}`);
    if (state.tag) bits.push(`tag ${state.tag}`);
    if (state.bucket) bits.push(`bucket ${(choices.buckets.find((b) => b.bucket_id === state.bucket) || {}).name || state.bucket}`);
    if (state.cluster) bits.push(`cluster ${state.clusterName}`);
    if (state.from || state.to) bits.push(`taken ${state.from || "…"} to ${state.to || "…"}`);
    if (state.camera) bits.push(`camera ${state.camera}`);
    if (state.gps) bits.push("with GPS");
    if (state.where) bits.push(`where ${state.where}`);
    return bits.join(" · ");
  }

  async function load() {
    try { choices = await api("/browse/filters"); render(); } catch (e) {
      if (choices) toast(e.message, "error");  // a failed reload keeps the bar as it was
      else bar.replaceChildren(el("span", {class: "muted"}, e.message));
    }
  }

  // a stack expanded: its group becomes the cluster filter (all its members shown)
  function expand(clusterId, size) {
    Object.assign(state, {cluster: clusterId, clusterName: `near-duplicate group of ${size}`});
    render();
    onChange();
  }

  // a new tag joins the list; bucket counts follow writes and undos
  for (const name of ["imagelake:tagged", "imagelake:buckets-changed", "imagelake:undone"]) document.addEventListener(name, () => load());
  return {load, params, summary, expand, buckets: () => (choices ? choices.buckets.filter((b) => b.bucket_id !== "discard") : [])};
}
