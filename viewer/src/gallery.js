// The gallery, index.html: every product in the store with its status and thumbnail.
import { el, fetchProducts, notReadyMessage, statusText } from "./common.js";

function card(product) {
  const picture = product.thumbnail
    ? el("img", { class: "thumb", src: product.thumbnail, alt: "", loading: "lazy" })
    : el("div", { class: "thumb placeholder", "aria-hidden": "true", text: product.status === "DONE" ? "3D" : "…" });
  const note = product.status === "DONE" ? null : el("p", { class: "note", text: notReadyMessage(product) });
  return el(
    "li",
    { class: "card", "data-status": product.status, "data-id": product.unique_id },
    el(
      "a",
      { href: `product.html?id=${encodeURIComponent(product.unique_id)}` },
      picture,
      el("h2", { text: product.title }),
      el("span", { class: "status", "data-status": product.status, text: statusText(product.status) }),
      note,
    ),
  );
}

async function main() {
  const list = document.getElementById("products");
  const message = document.getElementById("message");
  const products = await fetchProducts();
  if (products.length === 0) {
    message.textContent = "No products in this store yet. Queue a seller's video with KoroKoro and it will appear here.";
    message.hidden = false;
  }
  // Ready models first, then the rest, newest last as the store lists them.
  const order = { DONE: 0, PROCESSING: 1, IDLE: 2, FAILED: 3 };
  products.sort((a, b) => (order[a.status] ?? 9) - (order[b.status] ?? 9));
  list.replaceChildren(...products.map(card));
  document.body.dataset.state = "loaded";
}

main().catch((err) => {
  const message = document.getElementById("message");
  message.textContent = err.message;
  message.className = "message error";
  message.hidden = false;
  document.body.dataset.state = "error";
});
