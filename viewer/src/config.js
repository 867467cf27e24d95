// Where the viewer reads products and models from: `config.json` next to the pages.
//
//   absent, or {"mode": "local"}   the local store through `korokoro view` (/api/products, /store/...)
//   {"mode": "supabase", "supabase_url": "https://<ref>.supabase.co",
//    "anon_key": "<the project's anon / publishable key>", "bucket": "korokoro_bucket"}
//
// The anon key is public by design: row-level security (infra/supabase/002_supabase_policies.sql)
// limits it to DONE products and their models. A service-role or secret key bypasses RLS, so the
// viewer refuses one before sending a single request with it. Keys never appear in messages.

import { ViewerError } from "./errors.js";

export class ConfigError extends ViewerError {}

const LOOPBACK = new Set(["localhost", "127.0.0.1", "[::1]"]);
const BUCKET = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$/;
const FIX = "Put the project's anon (publishable) key in config.json";

function base64UrlJson(segment) {
  const b64 = segment.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(segment.length / 4) * 4, "=");
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** The `role` claim of a JWT-shaped key (legacy anon / service_role keys), or null if not a JWT. */
export function jwtRole(key) {
  const segments = String(key).split(".");
  if (segments.length !== 3 || !segments[0].startsWith("eyJ")) return null;
  try {
    const payload = base64UrlJson(segments[1]);
    return typeof payload?.role === "string" ? payload.role : "";
  } catch {
    return "";
  }
}

/** Throw a ConfigError unless ``key`` is one a browser may hold: an anon JWT or an sb_publishable_ key. */
export function checkAnonKey(key) {
  if (typeof key !== "string" || key.trim() === "") {
    throw new ConfigError(`config.json has no anon_key. ${FIX}.`);
  }
  if (key.startsWith("sb_secret_")) {
    throw new ConfigError(
      "config.json holds a Supabase secret key (sb_secret_…): it bypasses row-level security and must never " +
        `reach a browser, so the viewer will not use it. ${FIX}, and rotate the secret key: it has been published.`,
    );
  }
  if (key.startsWith("sb_publishable_")) return;
  const role = jwtRole(key);
  if (role === "service_role" || role === "supabase_admin") {
    throw new ConfigError(
      `config.json holds a Supabase key with the ${role} role: it bypasses row-level security and must never ` +
        `reach a browser, so the viewer will not use it. ${FIX}, and rotate the service key: it has been published.`,
    );
  }
  if (role === null || role === "") {
    throw new ConfigError(`config.json's anon_key is neither a publishable key (sb_publishable_…) nor an anon JWT. ${FIX}.`);
  }
  if (role !== "anon") {
    throw new ConfigError(`config.json's anon_key has the role “${role}”, not anon. ${FIX}.`);
  }
}

function checkUrl(raw) {
  let url;
  try {
    url = new URL(String(raw ?? ""));
  } catch {
    throw new ConfigError("config.json's supabase_url is not a URL; it should look like https://<project>.supabase.co.");
  }
  const local = url.protocol === "http:" && LOOPBACK.has(url.hostname);
  if (url.protocol !== "https:" && !local) {
    throw new ConfigError("config.json's supabase_url must be https (http only for a local Supabase on localhost).");
  }
  if (url.username || url.password || url.search || url.hash) {
    throw new ConfigError("config.json's supabase_url must be the bare project URL, without credentials or a query.");
  }
  return url.href.replace(/\/+$/, "");
}

/** A checked configuration: {mode: "local"} or {mode: "supabase", url, anonKey, bucket}. */
export function parseConfig(raw) {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new ConfigError("config.json must hold a JSON object.");
  }
  const mode = raw.mode ?? "local";
  if (mode === "local") return { mode };
  if (mode !== "supabase") throw new ConfigError(`config.json's mode is “${mode}”; the viewer knows “local” and “supabase”.`);
  if ("service_key" in raw || "service_role_key" in raw) {
    throw new ConfigError("config.json names a service key: remove it (and rotate it); the viewer needs only the anon key.");
  }
  checkAnonKey(raw.anon_key);
  const bucket = raw.bucket ?? "korokoro_bucket";
  if (typeof bucket !== "string" || !BUCKET.test(bucket)) {
    throw new ConfigError("config.json's bucket is not a valid bucket id.");
  }
  return { mode, url: checkUrl(raw.supabase_url), anonKey: raw.anon_key, bucket };
}

/** Read config.json next to the page; none there means the local store (`korokoro view`). */
export async function loadConfig() {
  let res;
  try {
    res = await fetch("config.json", { cache: "no-cache" });
  } catch (err) {
    throw new ConfigError(`Could not read the viewer's config.json (${err.message}).`);
  }
  if (res.status === 404) return { mode: "local" };
  if (!res.ok) throw new ConfigError(`Could not read the viewer's config.json: the server answered ${res.status}.`);
  let raw;
  try {
    raw = await res.json();
  } catch {
    throw new ConfigError("The viewer's config.json is not valid JSON.");
  }
  return parseConfig(raw);
}
