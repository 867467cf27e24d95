// The product page, product.html?id=<unique_id>: manifest → parts (parallel, sha256-checked)
// → one GLB Blob → <model-viewer>. Every failure ends in a visible message, never a blank canvas.
// document.body.dataset.state tells tests (and CSS) where the page is:
// loading → loaded | not-ready | error.
import { ModelViewerElement } from "@google/model-viewer";
import { UNIQUE_ID, fetchProducts, formatBytes, notReadyMessage, statusText } from "./common.js";
import { ViewerError, downloadAsset, fetchManifest, webAsset } from "./shards.js";

// model-viewer would fetch the Draco and KTX2 decoders (and its Lottie loader) from Google's
// CDN, only for models that use them. The pipeline's GLBs use none; this page fetches nothing
// off its own server, so such a model fails with a message instead. (Meshopt is bundled: three's
// decoder is inside product.js and needs no location.)
ModelViewerElement.dracoDecoderLocation = "/assets/decoders/draco/";
ModelViewerElement.ktx2TranscoderLocation = "/assets/decoders/basis/";
ModelViewerElement.lottieLoaderLocation = "/assets/decoders/lottie.js";

const LOAD_TIMEOUT_MS = 60_000;

const $ = (id) => document.getElementById(id);

function setState(state) {
  document.body.dataset.state = state;
}

function showMessage(kind, text) {
  const box = $("message");
  box.className = `message ${kind}`;
  box.textContent = text;
  box.hidden = false;
  $("stage").hidden = true;
  setState(kind === "error" ? "error" : "not-ready");
}

function hasWebGL() {
  const canvas = document.createElement("canvas");
  try {
    return Boolean(canvas.getContext("webgl2") || canvas.getContext("webgl"));
  } catch {
    return false;
  }
}

function showProgress({ loaded, total, verified, parts }) {
  const bar = $("progress");
  bar.max = Math.max(total, 1);
  bar.value = loaded;
  $("progress-text").textContent =
    `Downloading the 3D model: ${formatBytes(loaded)} of ${formatBytes(total)} · ${verified} of ${parts} parts verified`;
}

function waitForModel(viewer) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new ViewerError("The 3D model took too long to display. Reload the page to try again.")),
      LOAD_TIMEOUT_MS,
    );
    viewer.addEventListener(
      "load",
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
    viewer.addEventListener(
      "error",
      (event) => {
        clearTimeout(timer);
        const detail = event.detail?.sourceError?.message || event.detail?.type || "unknown error";
        reject(new ViewerError(`The 3D model was downloaded but could not be displayed (${detail}).`));
      },
      { once: true },
    );
  });
}

async function main() {
  setState("loading");
  const uniqueId = new URLSearchParams(location.search).get("id") || "";
  if (!UNIQUE_ID.test(uniqueId)) {
    showMessage("error", uniqueId ? `“${uniqueId}” is not a valid product id.` : "No product was chosen: open a product from the gallery.");
    return;
  }
  const product = (await fetchProducts()).find((p) => p.unique_id === uniqueId);
  if (!product) {
    showMessage("error", `There is no product ${uniqueId} in this store.`);
    return;
  }
  document.title = `${product.title} · KoroKoro`;
  $("title").textContent = product.title;
  $("status").textContent = statusText(product.status);
  $("status").dataset.status = product.status;
  if (product.status !== "DONE") {
    showMessage(product.status === "FAILED" ? "error" : "info", notReadyMessage(product));
    return;
  }
  if (!hasWebGL()) {
    showMessage("error", "This browser cannot show 3D models: WebGL is turned off or unavailable.");
    return;
  }

  const viewer = $("viewer");
  viewer.alt = `3D model of ${product.title}`;
  if (product.thumbnail) {
    $("poster-image").src = product.thumbnail;
    $("poster-image").hidden = false;
  }
  const manifest = await fetchManifest(uniqueId);
  const asset = webAsset(manifest);
  showProgress({ loaded: 0, total: asset.size ?? 0, verified: 0, parts: asset.parts.length });
  const blob = await downloadAsset(uniqueId, asset, { onProgress: showProgress });
  $("progress-text").textContent = `Verified ${formatBytes(blob.size)} in ${asset.parts.length} parts; preparing the 3D view…`;

  const loaded = waitForModel(viewer);
  viewer.src = URL.createObjectURL(blob);
  await loaded;
  $("poster").hidden = true;
  setState("loaded");
}

main().catch((err) => {
  console.error(err);
  showMessage("error", err instanceof ViewerError ? err.message : `The 3D model could not be shown: ${err.message}`);
});
