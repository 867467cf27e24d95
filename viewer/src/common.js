// Shared by both pages: the product list, status wording and small DOM helpers.
// Titles and errors come from sellers and logs: they only ever go through textContent.

export const UNIQUE_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

export async function fetchProducts() {
  let res;
  try {
    res = await fetch("/api/products", { cache: "no-store" });
  } catch (err) {
    throw new Error(`Could not reach the KoroKoro viewer server (${err.message}). Is \`korokoro view\` still running?`);
  }
  if (!res.ok) throw new Error(`The viewer server answered ${res.status} ${res.statusText} for the product list.`);
  const body = await res.json();
  if (!Array.isArray(body)) throw new Error("The viewer server sent a malformed product list.");
  return body;
}

const STATUS_TEXT = {
  IDLE: "Waiting in the queue",
  PROCESSING: "Being turned into 3D",
  DONE: "3D model ready",
  FAILED: "Failed",
};

export function statusText(status) {
  return STATUS_TEXT[status] || String(status);
}

/** Why a product that is not DONE has no model to show, in words for the page. */
export function notReadyMessage(product) {
  switch (product.status) {
    case "IDLE":
      return `“${product.title}” is waiting in the queue; its 3D model is not ready yet.`;
    case "PROCESSING":
      return `“${product.title}” is being turned into a 3D model right now; come back when it is done.`;
    case "FAILED":
      return `“${product.title}” could not be turned into a 3D model: ${product.error || "no reason was recorded"}.`;
    default:
      return `“${product.title}” has no 3D model (status ${product.status}).`;
  }
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MB`;
  return `${(n / 1024 ** 3).toFixed(2)} GB`;
}
