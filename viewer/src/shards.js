// Download a manifest's asset: every part in parallel, each checked against the manifest's
// size and sha256 (crypto.subtle) before the parts are joined, in manifest order, into a Blob.
// Mirrors tasks/shard.py:reassemble: a missing or corrupt part is refused, never shown.
// Objects come from a source (sources.js): the local store or a Supabase bucket.
import { ViewerError } from "./errors.js";

export { ViewerError };
export const MANIFEST_VERSION = 1;
const MANIFEST_NAME = "manifest.json";
const PART_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const SHA256 = /^[0-9a-f]{64}$/;
const USDZ_TYPE = "model/vnd.usdz+zip";

function toHex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function sha256Hex(data) {
  return toHex(await crypto.subtle.digest("SHA-256", data));
}

export async function fetchManifest(source, uniqueId) {
  let res;
  try {
    res = await source.fetchObject(uniqueId, MANIFEST_NAME);
  } catch (err) {
    throw new ViewerError(`Could not download the model's manifest (${err.message}).`);
  }
  if (res === null) throw new ViewerError("The model's manifest is missing from the store.");
  if (!res.ok) throw new ViewerError(`Could not download the model's manifest: the server answered ${res.status}.`);
  let manifest;
  try {
    manifest = await res.json();
  } catch {
    throw new ViewerError("The model's manifest is not valid JSON.");
  }
  if (manifest?.version !== MANIFEST_VERSION) {
    throw new ViewerError(`The model's manifest has version ${manifest?.version}; this viewer reads version ${MANIFEST_VERSION}.`);
  }
  if (manifest.unique_id !== uniqueId) {
    throw new ViewerError(`The manifest describes product ${manifest.unique_id}, not ${uniqueId}.`);
  }
  if (!Array.isArray(manifest.assets)) throw new ViewerError("The model's manifest lists no assets.");
  return manifest;
}

function checkParts(asset) {
  const parts = asset.parts;
  if (!Array.isArray(parts) || parts.length === 0) throw new ViewerError(`The manifest lists no parts for ${asset.name}.`);
  for (const p of parts) {
    if (!p || !PART_NAME.test(p.name) || !Number.isSafeInteger(p.size) || p.size < 0 || !SHA256.test(p.sha256)) {
      throw new ViewerError(`The manifest's entry for a part of ${asset.name} is malformed.`);
    }
  }
  const total = parts.reduce((s, p) => s + p.size, 0);
  if (Number.isSafeInteger(asset.size) && asset.size !== total) {
    throw new ViewerError(`The manifest's part sizes of ${asset.name} add up to ${total} bytes, not ${asset.size}.`);
  }
  return asset;
}

/** The web GLB of a manifest (role "web"), checked for a well-formed part list. */
export function webAsset(manifest) {
  const asset = manifest.assets.find((a) => a && a.role === "web");
  if (!asset) throw new ViewerError("The model's manifest has no web (GLB) asset.");
  return checkParts(asset);
}

/** The USDZ for iOS Quick Look (role "usdz" or "ios", or a USDZ content type), or null if none. */
export function usdzAsset(manifest) {
  const asset = manifest.assets.find(
    (a) => a && (a.role === "usdz" || a.role === "ios" || a.content_type === USDZ_TYPE || /\.usdz$/i.test(a.name || "")),
  );
  return asset ? checkParts(asset) : null;
}

async function fetchPart(source, uniqueId, part, index, count, onBytes, signal) {
  const label = `Part ${index + 1} of ${count} (${part.name})`;
  let res;
  try {
    res = await source.fetchObject(uniqueId, part.name, { signal });
  } catch (err) {
    if (signal.aborted) throw err;
    throw new ViewerError(`${label} could not be downloaded (${err.message}).`);
  }
  if (res === null) throw new ViewerError(`${label} is missing from the store; the model cannot be shown.`);
  if (!res.ok) throw new ViewerError(`${label} could not be downloaded: the server answered ${res.status}.`);
  const buf = new Uint8Array(part.size);
  let got = 0;
  const reader = res.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (got + value.length > part.size) {
      await reader.cancel();
      throw new ViewerError(`${label} is corrupt: it is larger than the ${part.size} bytes the manifest lists.`);
    }
    buf.set(value, got);
    got += value.length;
    onBytes(value.length);
  }
  if (got !== part.size) {
    throw new ViewerError(`${label} is corrupt: ${got} bytes instead of the ${part.size} the manifest lists.`);
  }
  if ((await sha256Hex(buf)) !== part.sha256) {
    throw new ViewerError(`${label} is corrupt: its sha256 does not match the manifest.`);
  }
  return buf;
}

/**
 * Download and verify every part of ``asset`` from ``source``; resolve to a Blob of the whole.
 * ``onProgress({loaded, total, verified, parts})`` is called as bytes arrive.
 */
export async function downloadAsset(source, uniqueId, asset, { onProgress = () => {}, concurrency = 4 } = {}) {
  if (!globalThis.crypto?.subtle) {
    throw new ViewerError(
      "This page cannot verify the model: the browser only offers crypto.subtle on https or localhost pages. " +
        "Open the viewer at http://127.0.0.1 or behind https.",
    );
  }
  const parts = asset.parts;
  const total = parts.reduce((s, p) => s + p.size, 0);
  const state = { loaded: 0, total, verified: 0, parts: parts.length };
  const buffers = new Array(parts.length);
  const abort = new AbortController();
  let next = 0;
  const worker = async () => {
    while (next < parts.length && !abort.signal.aborted) {
      const i = next++;
      buffers[i] = await fetchPart(source, uniqueId, parts[i], i, parts.length, (n) => {
        state.loaded += n;
        onProgress(state);
      }, abort.signal);
      state.verified += 1;
      onProgress(state);
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(concurrency, parts.length) }, worker));
  } catch (err) {
    abort.abort();
    throw err;
  }
  const blob = new Blob(buffers, { type: asset.content_type || "model/gltf-binary" });
  if (SHA256.test(asset.sha256 || "") && (await sha256Hex(await blob.arrayBuffer())) !== asset.sha256) {
    throw new ViewerError(`${asset.name} joined from its parts does not match the manifest's sha256.`);
  }
  return blob;
}
