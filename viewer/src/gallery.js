// The gallery, index.html: every product the source shows (the local store: all of them; Supabase
// with the anon key: the DONE ones) with its status and thumbnail.
import { el, notReadyMessage, pageSource, statusText } from "./common.js";

function card(product) {
  const placeholder = el("div", { class: "thumb placeholder", "aria-hidden": "true", text: product.status === "DONE" ? "3D" : "…" });
  const note = product.status === "DONE" ? null : el("p", { class: "note", text: notReadyMessage(product) });
  return el(
    "li",
    { class: "card", "data-status": product.status, "data-id": product.unique_id },
    el(
      "a",
      { href: `product.html?id=${encodeURIComponent(product.unique_id)}` },
      placeholder,
      el("h2", { text: product.title }),
      el("span", { class: "status", "data-status": product.status, text: statusText(product.status) }),
      note,
    ),
  );
}

/** Swap a card's placeholder for its thumbnail once (and if) one loads. */
async function fillThumbnail(source, product, node) {
  if (product.status !== "DONE") return;
  const src = await source.thumbnailUrl(product);
  if (!src) return;
  const img = el("img", { class: "thumb", src, alt: "" });
  try {
    await img.decode();
  } catch {
    return; // not an image after all: keep the placeholder
  }
  node.querySelector(".placeholder")?.replaceWith(img);
}

async function main() {
  const list = document.getElementById("products");
  const message = document.getElementById("message");
  const source = await pageSource();
  const products = await source.listProducts();
  if (products.length === 0) {
    message.textContent =
      source.mode === "supabase"
        ? "No finished products in this shop yet. Models appear here once KoroKoro has turned a seller's video into 3D."
        : "No products in this store yet. Queue a seller's video with KoroKoro and it will appear here.";
    message.hidden = false;
  }
  // Ready models first, then the rest, newest last as the store lists them.
  const order = { DONE: 0, PROCESSING: 1, IDLE: 2, FAILED: 3 };
  products.sort((a, b) => (order[a.status] ?? 9) - (order[b.status] ?? 9));
  const cards = products.map(card);
  list.replaceChildren(...cards);
  // "loaded" once every thumbnail has arrived or given up (the cards are usable before).
  await Promise.allSettled(products.map((p, i) => fillThumbnail(source, p, cards[i])));
  document.body.dataset.state = "loaded";
}

main().catch((err) => {
  console.error(err);
  const message = document.getElementById("message");
  message.textContent = err.message;
  message.className = "message error";
  message.hidden = false;
  document.body.dataset.state = "error";
});
