// Where products and model objects come from, one small object per store (a registry keyed by
// config.json's mode). Every source offers the same four calls:
//
//   listProducts()                     → [{unique_id, title, status, error}]   (the gallery)
//   getProduct(uniqueId)               → one such row, or null
//   fetchObject(uniqueId, name, init)  → the Response of models/<uniqueId>/<name>, or null if missing
//                                        (network failures throw as fetch does; callers word them)
//   thumbnailUrl(product)              → an image URL for the card / poster, or null
//
// plus absentMessage(uniqueId), the words for a product getProduct did not find.
import { ViewerError } from "./errors.js";

// The preview image the flow publishes next to the manifest (a turntable strip of the model).
export const PREVIEW_NAME = "preview.png";

async function request(url, init, what) {
  try {
    return await fetch(url, init);
  } catch (err) {
    if (init?.signal?.aborted) throw err;
    throw new ViewerError(`${what} (${err.message}).`);
  }
}

function localSource() {
  const objectUrl = (uniqueId, name) => `/store/models/${encodeURIComponent(uniqueId)}/${encodeURIComponent(name)}`;
  const source = {
    mode: "local",
    async listProducts() {
      const res = await request("/api/products", { cache: "no-store" }, "Could not reach the KoroKoro viewer server; is `korokoro view` still running?");
      if (!res.ok) throw new ViewerError(`The viewer server answered ${res.status} ${res.statusText} for the product list.`);
      const body = await res.json();
      if (!Array.isArray(body)) throw new ViewerError("The viewer server sent a malformed product list.");
      return body;
    },
    async getProduct(uniqueId) {
      return (await source.listProducts()).find((p) => p.unique_id === uniqueId) ?? null;
    },
    async fetchObject(uniqueId, name, init = {}) {
      const res = await fetch(objectUrl(uniqueId, name), { cache: "no-cache", ...init });
      return res.status === 404 ? null : res;
    },
    async thumbnailUrl(product) {
      return product.thumbnail || null; // the server names whichever preview image exists
    },
    absentMessage(uniqueId) {
      return `There is no product ${uniqueId} in this store.`;
    },
  };
  return source;
}

// PostgREST for the products table, Storage for the bucket, both with the anon key; the
// policies of 002_supabase_policies.sql let it read DONE rows and models/<id>/... of DONE
// products. The bucket is private, so objects come from the authenticated object URL (a
// public URL could not carry the key), fetched with headers, never put in an <img src>.
function supabaseSource({ url, anonKey, bucket }) {
  const headers = { apikey: anonKey, Authorization: `Bearer ${anonKey}` };
  const columns = "unique_id,title,status";
  const host = new URL(url).host;

  async function rows(filters) {
    const query = `select=${columns}&status=eq.DONE${filters}&order=created_at.asc`;
    const res = await request(`${url}/rest/v1/products?${query}`, { headers, cache: "no-store" }, `Could not reach the Supabase project at ${host}`);
    if (res.status === 401 || res.status === 403) {
      throw new ViewerError(`The Supabase project at ${host} refused the anon key (${res.status}): check anon_key in config.json.`);
    }
    if (!res.ok) {
      throw new ViewerError(
        `The Supabase project at ${host} answered ${res.status} for the product list; ` +
          "are infra/supabase/001_products_queue.sql and 002_supabase_policies.sql applied?",
      );
    }
    const body = await res.json();
    if (!Array.isArray(body)) throw new ViewerError(`The Supabase project at ${host} sent a malformed product list.`);
    return body;
  }

  // Supabase Storage answers a missing object, or one RLS hides, with 400 and a JSON body whose
  // statusCode is "404" (newer versions with 404 itself).
  async function isMissing(res) {
    if (res.status === 404) return true;
    if (res.status !== 400) return false;
    const body = await res.clone().json().catch(() => null);
    return String(body?.statusCode) === "404" || body?.error === "not_found";
  }

  const source = {
    mode: "supabase",
    listProducts: () => rows(""),
    async getProduct(uniqueId) {
      return (await rows(`&unique_id=eq.${encodeURIComponent(uniqueId)}&limit=1`))[0] ?? null;
    },
    async fetchObject(uniqueId, name, init = {}) {
      const key = ["models", uniqueId, name].map(encodeURIComponent).join("/");
      const res = await fetch(`${url}/storage/v1/object/authenticated/${encodeURIComponent(bucket)}/${key}`, {
        cache: "no-cache",
        ...init,
        headers,
      });
      if (await isMissing(res)) return null;
      if (res.status === 401 || res.status === 403) {
        throw new ViewerError(`The Supabase project at ${host} refused the anon key for ${name} (${res.status}).`);
      }
      return res;
    },
    async thumbnailUrl(product) {
      try {
        const res = await source.fetchObject(product.unique_id, PREVIEW_NAME);
        return res?.ok ? URL.createObjectURL(await res.blob()) : null;
      } catch {
        return null; // a picture is decoration: no thumbnail, no error
      }
    },
    absentMessage(uniqueId) {
      return (
        `“${uniqueId}” is not in this shop yet: a product appears here once its 3D model is ready ` +
        "(it may still be in the queue or being processed, or the link may be wrong)."
      );
    },
  };
  return source;
}

const SOURCES = { local: localSource, supabase: supabaseSource };

/** The source for a parsed config (see config.js). */
export function openSource(config) {
  const make = SOURCES[config.mode];
  if (!make) throw new ViewerError(`The viewer has no source for mode “${config.mode}”.`);
  return make(config);
}
