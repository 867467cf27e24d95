"""The shop-page viewer in Supabase mode: pages served statically with a config.json, reading a
loopback stand-in of PostgREST + Storage (tests/viewer_supabase_standin.py) with the anon key.

The stand-in is another origin than the pages, as a real project is, so CORS preflights happen,
and it enforces infra/supabase/002_supabase_policies.sql: anon sees DONE rows and their models.
It is not Supabase; what it mimics is listed in its docstring.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_viewer import (  # noqa: F401  (shop is a fixture)
    BUCKET,
    VIEWER,
    browser_skip_reason,
    non_background_fraction,
    run_browser,
    shop,
)
from tests.viewer_supabase_standin import SupabaseStandIn, make_jwt

ANON = make_jwt("anon")
SERVICE = make_jwt("service_role")
SECRET = "sb_secret_standinSecretKey0123456789abcdef"


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        pass


def static_sites(root: Path, configs: dict[str, dict]) -> ThreadingHTTPServer:
    """One static host with a copy of viewer/www under /<name>/ per config, plus its config.json."""
    for name, config in configs.items():
        site = root / name
        shutil.copytree(VIEWER / "www", site)
        (site / "config.json").write_text(json.dumps(config))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_config_accepts_anon_keys_and_refuses_service_keys():
    """viewer/src/config.js's key check, run by node on its own (no browser)."""
    if not shutil.which("node"):
        pytest.skip("node is not installed")
    cases = {
        "anon": {"mode": "supabase", "supabase_url": "https://abc.supabase.co/", "anon_key": ANON},
        "publishable": {"mode": "supabase", "supabase_url": "https://abc.supabase.co", "anon_key": "sb_publishable_x1"},
        "service": {"mode": "supabase", "supabase_url": "https://abc.supabase.co", "anon_key": SERVICE},
        "secret": {"mode": "supabase", "supabase_url": "https://abc.supabase.co", "anon_key": SECRET},
        "authenticated": {"mode": "supabase", "supabase_url": "https://abc.supabase.co", "anon_key": make_jwt("authenticated")},
        "garbage": {"mode": "supabase", "supabase_url": "https://abc.supabase.co", "anon_key": "hello"},
        "plain-http": {"mode": "supabase", "supabase_url": "http://abc.supabase.co", "anon_key": ANON},
        "local-http": {"mode": "supabase", "supabase_url": "http://127.0.0.1:54321", "anon_key": ANON},
        "extra-service-key": {"mode": "supabase", "supabase_url": "https://abc.supabase.co", "anon_key": ANON, "service_key": SERVICE},
        "local": {},
    }
    script = (
        f"import('{(VIEWER / 'src' / 'config.js').as_uri()}').then(({{ parseConfig }}) => {{"
        "  const out = {};"
        f"  for (const [name, raw] of Object.entries({json.dumps(cases)})) {{"
        "    try { const c = parseConfig(raw); out[name] = { ok: true, mode: c.mode, url: c.url ?? null, bucket: c.bucket ?? null }; }"
        "    catch (err) { out[name] = { ok: false, error: err.message, type: err.constructor.name }; }"
        "  }"
        "  console.log(JSON.stringify(out));"
        "});"
    )
    done = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["anon"] == {"ok": True, "mode": "supabase", "url": "https://abc.supabase.co", "bucket": "korokoro_bucket"}
    assert got["publishable"]["ok"] and got["local-http"]["ok"] and got["local"] == {"ok": True, "mode": "local", "url": None, "bucket": None}
    assert not got["service"]["ok"] and "service_role" in got["service"]["error"] and "rotate" in got["service"]["error"]
    assert not got["secret"]["ok"] and "secret key" in got["secret"]["error"]
    assert not got["authenticated"]["ok"] and "not anon" in got["authenticated"]["error"]
    assert not got["garbage"]["ok"] and not got["plain-http"]["ok"] and "https" in got["plain-http"]["error"]
    assert not got["extra-service-key"]["ok"]
    for name, result in got.items():  # no message repeats a key
        assert all(key not in json.dumps(result) for key in (ANON, SERVICE, SECRET)), name
        assert result["ok"] or result["type"] == "ConfigError"


def test_supabase_mode_in_chromium(shop, tmp_path):
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    store, manifests, _ = shop
    with SupabaseStandIn(store, BUCKET, {ANON: "anon", SERVICE: "service_role"}) as supabase:
        config = {"mode": "supabase", "supabase_url": supabase.url, "bucket": BUCKET}
        sites = static_sites(
            tmp_path / "sites",
            {"shop": {**config, "anon_key": ANON}, "leaky": {**config, "anon_key": SERVICE}, "secret": {**config, "anon_key": SECRET}},
        )
        try:
            report = run_browser(
                None,
                [
                    {"name": "gallery", "path": "shop/", "screenshot": "supabase-gallery.png"},
                    {"name": "box", "path": "shop/product.html?id=box", "screenshot": "supabase-product-box.png"},
                    {"name": "holey", "path": "shop/product.html?id=holey"},
                    {"name": "queued", "path": "shop/product.html?id=queued", "screenshot": "supabase-product-queued.png"},
                    {"name": "broken", "path": "shop/product.html?id=broken"},
                    {"name": "leaky", "path": "leaky/", "screenshot": "supabase-service-key.png"},
                    {"name": "leaky-product", "path": "leaky/product.html?id=box"},
                    {"name": "secret", "path": "secret/"},
                ],
                tmp_path,
                "supabase",
                base_url=f"http://127.0.0.1:{sites.server_address[1]}/",
                allowed_origins=[supabase.url],
            )
        finally:
            sites.shutdown()
            sites.server_close()
    results = {r["name"]: r for r in report["results"]}

    # The gallery lists the DONE products only, with box's preview.png fetched with the key.
    gallery = results["gallery"]
    assert gallery["state"] == "loaded" and gallery["cards"] == 2 and gallery["thumbs"] == 1, gallery

    box = results["box"]
    assert box["state"] == "loaded" and box["model_visible"] is True, f"{box['message']}; {box['console_errors']}"
    assert box["badge"] == {"text": "3D model ready", "status": "DONE"}
    assert box["poster"].startswith("blob:")  # preview.png, fetched with the key (a private bucket)
    assert non_background_fraction(Path(box["screenshot"])) > 0.03

    # A part the bucket lacks (Storage's 400 "not_found") is a missing part, not a server error.
    holey = results["holey"]
    assert holey["state"] == "error" and "missing" in holey["message"], holey
    assert holey["badge"]["status"] == "UNAVAILABLE"
    # Products that are not DONE are invisible to anon: the page says so, nothing is downloaded.
    for name in ("queued", "broken"):
        assert results[name]["state"] == "not-ready" and "not in this shop yet" in results[name]["message"], results[name]
        assert results[name]["badge"] is None
    # A service-role or secret key in config.json is refused before any request is made with it.
    for name in ("leaky", "leaky-product"):
        assert results[name]["state"] == "error" and "service_role" in results[name]["message"], results[name]
    assert results["secret"]["state"] == "error" and "secret key" in results["secret"]["message"]
    for r in results.values():
        assert r["foreign_requests"] == [], f"{r['name']} fetched off the two servers: {r['foreign_requests']}"

    # What the stand-in saw: every call carried the anon key, no other key ever left the page.
    calls = [r for r in supabase.requests if r["method"] != "OPTIONS"]
    assert calls and all(r["apikey"] == ANON and r["authorization"] == f"Bearer {ANON}" for r in calls)
    assert all(SERVICE not in json.dumps(r) and SECRET not in json.dumps(r) for r in supabase.requests)
    assert any(r["method"] == "OPTIONS" for r in supabase.requests)  # cross-origin with headers: preflights
    listing = [r for r in calls if r["path"] == "/rest/v1/products"]
    assert listing and all("status=eq.DONE" in r["query"] for r in listing)
    objects = [r["path"] for r in calls if r["path"].startswith("/storage/")]
    prefix = f"/storage/v1/object/authenticated/{BUCKET}/models/"
    assert objects and all(p.startswith(prefix + "box/") or p.startswith(prefix + "holey/") for p in objects)
    assert f"{prefix}box/manifest.json" in objects and f"{prefix}box/preview.png" in objects
