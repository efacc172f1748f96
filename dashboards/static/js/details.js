// The image drawer: metadata, tags, clusters and similar images of one image. Each part loads on
// its own, so a lake without an index or tags still shows the rest.
import {api, el, thumbUrl} from "./api.js";

export function mountDetails(root, {thumbSize, onOpen}) {
  const body = root.querySelector("#details-body");
  root.querySelector("#details-close").addEventListener("click", () => close());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !root.hidden) { e.preventDefault(); e.stopImmediatePropagation(); close(); }
  }, true);  // before the view's own keys

  function close() {
    root.hidden = true;
  }

  async function section(title, load) {
    const box = el("section", {class: "details-part"}, el("h3", {}, title), el("p", {class: "muted"}, "loading…"));
    body.append(box);
    try {
      const content = await load();
      box.lastChild.replaceWith(content);
    } catch (e) {
      box.lastChild.replaceWith(el("p", {class: "muted"}, e.status === 503 || e.status === 404 ? "not available yet" : e.message));
    }
  }

  async function open(imageId) {
    root.hidden = false;
    root.dataset.imageId = imageId;
    body.replaceChildren(el("img", {class: "details-image", alt: "selected image", src: thumbUrl(imageId, thumbSize)}));
    if (document.body.dataset.scope !== "read") body.append(bucketPicker(imageId));
    const image = api(`/images/${imageId}`).then((b) => b.image);  // one request for three sections
    image.catch(() => {});
    await Promise.all([
      section("Image", async () => {
        const row = await image;
        const rows = Object.entries(row).filter(([k]) => !["uris", "metadata", "capture", "quality"].includes(k));
        const meta = row.metadata ? Object.entries(row.metadata) : [];
        return el("dl", {}, [...rows, ...meta].flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v ?? "∅"))]),
                  el("dt", {}, "paths"), el("dd", {}, row.uris.join("\n")));
      }),
      section("Capture", async () => captureList((await image).capture)),
      section("Quality", async () => qualityList((await image).quality)),
      section("Tags", async () => {
        const res = await api(`/images/${imageId}/tags`);
        const tags = res.tags || [];
        return tags.length ? el("ul", {class: "chips"}, tags.map((t) => el("li", {title: `${t.source} ${t.score ?? ""}`}, t.tag)))
                           : el("p", {class: "muted"}, "no tags");
      }),
      section("Clusters", async () => {
        const res = await api(`/images/${imageId}/clusters`);
        const items = res.clusters || [];
        return items.length ? el("ul", {}, items.map((c) => el("li", {}, `${c.kind} ${c.cluster_id}${c.level != null ? ` (level ${c.level})` : ""}`)))
                            : el("p", {class: "muted"}, "in no cluster");
      }),
      section("Similar images", async () => {
        const res = await api(`/search/similar?image_id=${imageId}&k=12`);
        return el("div", {class: "mini-grid"}, res.results.map((r) =>
          el("button", {type: "button", class: "cell", title: `score ${r.score.toFixed(3)}`, onclick: () => onOpen(r.image_id)},
             el("img", {loading: "lazy", alt: "similar image", src: thumbUrl(r.image_id, thumbSize)}))));
      }),
    ]);
  }

  // capture metadata (the capture table) in words: date taken, camera, lens, exposure, GPS
  function captureList(c) {
    if (!c || !Object.keys(c).length) return el("p", {class: "muted"}, "no capture metadata");
    const rows = [];
    const add = (label, value) => { if (value !== null && value !== undefined && value !== "") rows.push([label, value]); };
    if (c.taken_at) add("date taken", c.taken_at.replace("T", " ").replace(/(\.\d+)?(Z|\+00:00)$/, " UTC") + (c.taken_offset ? ` (camera clock ${c.taken_offset})` : ""));
    add("camera", c.camera || [c.make, c.model].filter(Boolean).join(" "));
    add("lens", c.lens);
    const exposure = [];
    if (c.exposure_s) exposure.push(c.exposure_s < 1 ? `1/${Math.round(1 / c.exposure_s)} s` : `${c.exposure_s} s`);
    if (c.f_number) exposure.push(`f/${c.f_number}`);
    if (c.iso) exposure.push(`ISO ${c.iso}`);
    if (c.focal_mm) exposure.push(`${c.focal_mm} mm`);
    add("exposure", exposure.join(" · "));
    if (c.gps_lat != null && c.gps_lon != null) {
      add("GPS", `${c.gps_lat.toFixed(5)}, ${c.gps_lon.toFixed(5)}` + (c.gps_alt != null ? ` · ${c.gps_alt} m` : ""));
    }
    add("orientation", c.orientation);
    add("title", c.title);
    if (Array.isArray(c.keywords) && c.keywords.length) add("keywords", c.keywords.join(", "));
    if (!rows.length) return el("p", {class: "muted"}, "no capture metadata");
    // a table, not a <dl>: "#details dl" stays the Image section's
    return el("table", {class: "capture"}, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v))))));
  }

  const FLAGS = ["blurry", "dark", "bright", "low_contrast", "low_information", "grayscale", "odd_aspect", "tiny"];
  const MEASURES = ["blur", "brightness", "contrast", "entropy"];

  // quality flags (the image_quality table): the raised ones as chips, then the measures
  function qualityList(q) {
    if (!q) return el("p", {class: "muted"}, "not measured yet (the pipeline's quality step)");
    const raised = FLAGS.filter((f) => q[f] === true);
    const measures = MEASURES.filter((m) => typeof q[m] === "number").map((m) => `${m} ${q[m].toFixed(2)}`).join(" · ");
    return el("div", {class: "quality"},
      raised.length ? el("ul", {class: "chips quality-flags"}, raised.map((f) => el("li", {class: "flag"}, f.replace("_", " "))))
                    : el("p", {class: "quality-ok"}, "no quality issues"),
      measures ? el("p", {class: "muted"}, measures) : "");
  }

  // "add to bucket" from the drawer: any image, from any view, can start or grow a bucket
  function bucketPicker(imageId) {
    const choose = el("select", {id: "drawer-bucket", "aria-label": "bucket"});
    const button = el("button", {type: "button", id: "drawer-add", disabled: true}, "add to bucket");
    const said = el("span", {class: "muted", id: "drawer-bucket-status"});
    api("/buckets").then(({buckets}) => {
      const user = buckets.filter((b) => !b.system);
      choose.replaceChildren(...user.map((b) => el("option", {value: b.bucket_id}, b.name)));
      button.disabled = !user.length;
      if (!user.length) said.textContent = "no bucket yet: create one in Curate";
    }).catch(() => { said.textContent = "buckets unavailable"; });
    button.addEventListener("click", async () => {
      const bucketId = choose.value, name = choose.selectedOptions[0]?.textContent;
      try {
        await api(`/buckets/${bucketId}/images`, {method: "POST", json: {image_ids: [imageId]}});
        said.textContent = `added to "${name}"`;
        document.dispatchEvent(new CustomEvent("imagelake:buckets-changed", {detail: {kind: "add", bucketId, ids: [imageId]}}));
      } catch (e) { said.textContent = e.message; }
    });
    return el("div", {class: "drawer-bucket"}, choose, button, said);
  }

  return {open, close};
}
