// The one door to the JSON API: same-origin fetch with the login cookie, errors thrown as ApiError.

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export async function api(path, {method = "GET", json, form, signal} = {}) {
  const init = {method, credentials: "same-origin", signal, headers: {}};
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await fetch(`/api/v1${path}`, init);
  let body;
  try {
    body = await response.json();
  } catch {
    throw new ApiError(`${method} ${path}: HTTP ${response.status}`, response.status);
  }
  if (response.status === 401) {
    window.location.assign("/login");
  }
  if (!response.ok || body.ok === false) {
    throw new ApiError(body.error || `HTTP ${response.status}`, response.status);
  }
  // a bucket write changes what undo and redo would act on (undo.js asks again)
  if (method !== "GET" && /^\/(buckets|discard|undo|redo)\b/.test(path)) document.dispatchEvent(new CustomEvent("imagelake:wrote"));
  return body;
}

export function thumbUrl(imageId, size) {
  return `/api/v1/images/${imageId}/thumbnail?size=${size}`;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const item = el("div", {class: `toast ${kind}`, role: kind === "error" ? "alert" : "status"}, message);
  box.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 8000 : 3000);
}
