// Shared by both pages: status wording and small DOM helpers.
// Titles and errors come from sellers and logs: they only ever go through textContent.
import { loadConfig } from "./config.js";
import { openSource } from "./sources.js";

export const UNIQUE_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

/** The page's source of products and models, as config.json next to the page says. */
export async function pageSource() {
  return openSource(await loadConfig());
}

// A product's status in the store, and two states of the product page's model itself: the badge
// says "ready" only once the model is on screen, and "unavailable" when its parts fail.
const STATUS_TEXT = {
  IDLE: "Waiting in the queue",
  PROCESSING: "Being turned into 3D",
  DONE: "3D model ready",
  FAILED: "Failed",
  LOADING: "Loading the 3D model",
  UNAVAILABLE: "3D model unavailable",
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
