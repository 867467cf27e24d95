// Drive Debian's Chromium (headless, through playwright-core from viewer/node_modules) over the
// viewer's pages; tests/test_viewer.py runs it and checks what it reports.
//
//   node tests/viewer_browser.mjs plan.json
//
// plan.json: {"base_url", "out_dir", "chromium", "extra_args": [...], "allowed_origins": [...],
//   "scenarios": [{"name", "path", "screenshot": "file.png", "emulate_ios": bool}]}
// Prints one JSON object: {"results": [{name, state, message, title, badge, cards, thumbs, poster,
// screenshot, model_visible, ar, ios, ios_src, ios_sha256, requests, console_errors,
// foreign_requests, ms}], "user_agent", "webgl_renderer"}.
// "emulate_ios" makes the page look like iOS Safari to model-viewer (user agent and
// <a rel="ar"> support, before any script runs), so its Quick Look path can be checked here.
import { createRequire } from "node:module";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(resolve(here, "..", "viewer"), "package.json"));
const { chromium } = require("playwright-core");

const plan = JSON.parse(readFileSync(process.argv[2], "utf8"));
const base = new URL(plan.base_url);
const allowed = new Set([base.origin, ...(plan.allowed_origins ?? []).map((o) => new URL(o).origin)]);
const timeout = plan.timeout_ms ?? 60_000;
const IOS_UA =
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1";

function emulateIos(ua) {
  Object.defineProperty(Navigator.prototype, "userAgent", { get: () => ua });
  Object.defineProperty(Navigator.prototype, "platform", { get: () => "iPhone" });
  const supports = DOMTokenList.prototype.supports;
  DOMTokenList.prototype.supports = function (token) {
    return token === "ar" || supports.call(this, token);
  };
}

const args = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  ...(plan.extra_args ?? []),
];

const profile = mkdtempSync(join(tmpdir(), "korokoro-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: plan.chromium ?? "/usr/bin/chromium",
  headless: true,
  args,
  viewport: { width: 1000, height: 800 },
  deviceScaleFactor: 1,
  timeout,
});

const out = { results: [] };
try {
  for (const scenario of plan.scenarios) {
    const page = await context.newPage();
    const consoleErrors = [];
    const foreign = [];
    const requests = [];
    if (scenario.emulate_ios) await page.addInitScript(emulateIos, IOS_UA);
    page.on("console", (msg) => msg.type() === "error" && consoleErrors.push(msg.text()));
    page.on("pageerror", (err) => consoleErrors.push(String(err)));
    page.on("request", (req) => {
      const url = new URL(req.url());
      if (["blob:", "data:"].includes(url.protocol)) return;
      requests.push(url.origin === base.origin ? url.pathname : url.href);
      if (!allowed.has(url.origin)) foreign.push(req.url());
    });
    const started = Date.now();
    await page.goto(new URL(scenario.path, base).href, { waitUntil: "domcontentloaded", timeout });
    // The product page sets data-state to "loaded" in model-viewer's `load` handler.
    await page.waitForFunction(() => document.body.dataset.state !== "loading", null, { timeout });
    const state = await page.evaluate(() => document.body.dataset.state);
    let modelVisible = null;
    if (state === "loaded" && (await page.$("model-viewer"))) {
      await page.waitForFunction(() => document.querySelector("model-viewer").modelIsVisible, null, { timeout });
      await page.waitForTimeout(800); // poster fade-out
      modelVisible = await page.evaluate(() => document.querySelector("model-viewer").modelIsVisible);
    }
    let ios = {};
    if (scenario.emulate_ios && state === "loaded") {
      // The USDZ comes after the model is on screen; hash what model-viewer was given.
      await page.waitForFunction(() => document.body.dataset.ios, null, { timeout });
      ios = await page.evaluate(async () => {
        const viewer = document.querySelector("model-viewer");
        const out = { ios: document.body.dataset.ios, ar: viewer.canActivateAR, ios_src: viewer.iosSrc };
        if (viewer.iosSrc) {
          const digest = await crypto.subtle.digest("SHA-256", await (await fetch(viewer.iosSrc)).arrayBuffer());
          out.ios_sha256 = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
        }
        return out;
      });
    }
    const result = {
      name: scenario.name,
      state,
      ms: Date.now() - started,
      title: await page.title(),
      message: await page.evaluate(() => {
        const m = document.getElementById("message");
        return m && !m.hidden ? m.textContent : null;
      }),
      badge: await page.evaluate(() => {
        const b = document.getElementById("status");
        return b && b.textContent ? { text: b.textContent, status: b.dataset.status } : null;
      }),
      cards: await page.evaluate(() => document.querySelectorAll(".card").length),
      thumbs: await page.evaluate(() => [...document.querySelectorAll("img.thumb")].filter((i) => i.complete && i.naturalWidth > 0).length),
      poster: await page.evaluate(() => {
        const p = document.getElementById("poster-image");
        return p && !p.hidden ? p.src : null;
      }),
      model_visible: modelVisible,
      ar: ios.ar ?? null,
      ios: ios.ios ?? null,
      ios_src: ios.ios_src ?? null,
      ios_sha256: ios.ios_sha256 ?? null,
      requests,
      console_errors: consoleErrors,
      foreign_requests: foreign,
    };
    if (scenario.screenshot) {
      const target = state === "loaded" && (await page.$("model-viewer")) ? page.locator("model-viewer") : page;
      result.screenshot = join(plan.out_dir, scenario.screenshot);
      await target.screenshot({ path: result.screenshot });
      if (target !== page) {
        result.page_screenshot = join(plan.out_dir, scenario.screenshot.replace(/\.png$/, "-page.png"));
        await page.screenshot({ path: result.page_screenshot });
      }
    }
    if (!out.webgl_renderer) {
      out.webgl_renderer = await page.evaluate(() => {
        const gl = document.createElement("canvas").getContext("webgl2") || document.createElement("canvas").getContext("webgl");
        if (!gl) return "none";
        const ext = gl.getExtension("WEBGL_debug_renderer_info");
        return ext ? gl.getParameter(ext.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
      });
      out.user_agent = await page.evaluate(() => navigator.userAgent);
    }
    out.results.push(result);
    await page.close();
  }
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(out));
