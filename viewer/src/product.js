// The product page, product.html?id=<unique_id>: manifest → parts (parallel, sha256-checked)
// → one GLB Blob → <model-viewer>. Every failure ends in a visible message, never a blank canvas,
// and the status badge says "ready" only once the model is on screen.
// document.body.dataset.state tells tests (and CSS) where the page is:
// loading → loaded | not-ready | error. dataset.ios: the USDZ for Quick Look (absent | ready | failed).
import { ModelViewerElement } from "@google/model-viewer";
import { IS_AR_QUICKLOOK_CANDIDATE, IS_IOS_GSA } from "@google/model-viewer/lib/constants.js";
import { UNIQUE_ID, formatBytes, notReadyMessage, pageSource, statusText } from "./common.js";
import { ViewerError, downloadAsset, fetchManifest, usdzAsset, webAsset } from "./shards.js";

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

function setBadge(status) {
  $("status").textContent = statusText(status);
  $("status").dataset.status = status;
}

function showMessage(kind, text) {
  const box = $("message");
  box.className = `message ${kind}`;
  box.textContent = text;
  box.hidden = false;
  $("stage").hidden = true;
  // A product whose model fails is not "ready", whatever its row says (a FAILED one keeps "Failed").
  if (kind === "error" && ["DONE", "LOADING"].includes($("status").dataset.status)) setBadge("UNAVAILABLE");
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

async function showPoster(source, product) {
  const src = await source.thumbnailUrl(product);
  if (src && document.body.dataset.state === "loading") {
    $("poster-image").src = src;
    $("poster-image").hidden = false;
  }
}

/**
 * iOS Quick Look: only where model-viewer would offer it, fetch the manifest's USDZ (verified like
 * the GLB) and hand it over as ios-src. Without one, model-viewer makes a USDZ from the GLB itself.
 * Scene Viewer (Android) is not offered: it cannot read the blob: URL the verified GLB lives at.
 */
async function attachUsdz(source, uniqueId, manifest, viewer) {
  if (!IS_AR_QUICKLOOK_CANDIDATE || IS_IOS_GSA) return;
  try {
    const asset = usdzAsset(manifest); // a bad entry costs the USDZ only, never the shown model
    if (!asset) return;
    const blob = await downloadAsset(source, uniqueId, asset, { concurrency: 2 });
    viewer.iosSrc = URL.createObjectURL(new Blob([blob], { type: "model/vnd.usdz+zip" }));
    document.body.dataset.ios = "ready";
  } catch (err) {
    console.warn(`No USDZ for Quick Look: ${err.message}`);
    document.body.dataset.ios = "failed";
  }
}

async function main() {
  setState("loading");
  const uniqueId = new URLSearchParams(location.search).get("id") || "";
  if (!UNIQUE_ID.test(uniqueId)) {
    showMessage("error", uniqueId ? `“${uniqueId}” is not a valid product id.` : "No product was chosen: open a product from the gallery.");
    return;
  }
  const source = await pageSource();
  const product = await source.getProduct(uniqueId);
  if (!product) {
    showMessage(source.mode === "supabase" ? "info" : "error", source.absentMessage(uniqueId));
    return;
  }
  document.title = `${product.title} · KoroKoro`;
  $("title").textContent = product.title;
  if (product.status !== "DONE") {
    setBadge(product.status);
    showMessage(product.status === "FAILED" ? "error" : "info", notReadyMessage(product));
    return;
  }
  setBadge("LOADING");
  if (!hasWebGL()) {
    showMessage("error", "This browser cannot show 3D models: WebGL is turned off or unavailable.");
    return;
  }

  const viewer = $("viewer");
  viewer.alt = `3D model of ${product.title}`;
  const poster = showPoster(source, product);
  const manifest = await fetchManifest(source, uniqueId);
  const asset = webAsset(manifest);
  showProgress({ loaded: 0, total: asset.size ?? 0, verified: 0, parts: asset.parts.length });
  const blob = await downloadAsset(source, uniqueId, asset, { onProgress: showProgress });
  $("progress-text").textContent = `Verified ${formatBytes(blob.size)} in ${asset.parts.length} parts; preparing the 3D view…`;

  const loaded = waitForModel(viewer);
  viewer.src = URL.createObjectURL(blob);
  await loaded;
  await poster;
  $("poster").hidden = true;
  setBadge("DONE");
  setState("loaded");
  await attachUsdz(source, uniqueId, manifest, viewer);
}

main().catch((err) => {
  console.error(err);
  showMessage("error", err instanceof ViewerError ? err.message : `The 3D model could not be shown: ${err.message}`);
});
