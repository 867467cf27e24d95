"""The shop-page viewer: its server (always) and its pages in headless Chromium (when present).

The store here is made by hand, independent of the pipeline: a textured box exported as a GLB
by trimesh, cut into several parts with tasks.shard and published like tasks.upload does (the
pipeline-made model is opened by tests/test_pipeline.py; Supabase mode: test_viewer_supabase.py).
Screenshots go to test-artifacts/viewer/ so people can look at them.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flows.viewer_server import make_server, viewer_built
from tasks.shard import MANIFEST_NAME, split_file, write_manifest
from tasks.storage.base import StorageSettings
from tasks.storage.local import LocalStore

REPO = Path(__file__).resolve().parents[1]
VIEWER = REPO / "viewer"
BROWSER_SCRIPT = Path(__file__).with_name("viewer_browser.mjs")
ARTIFACTS = REPO / "test-artifacts" / "viewer"
CHROMIUM = os.environ.get("KOROKORO_CHROMIUM", "/usr/bin/chromium")
BUCKET = "korokoro_bucket"
BACKGROUND = (255, 255, 255)  # model-viewer's stage colour (viewer/www/style.css --stage)
# Headless Chromium has no GPU here: WebGL runs on SwiftShader, which Chromium only allows when asked.
GL_ARGS = os.environ.get("KOROKORO_CHROMIUM_GL_ARGS", "--use-angle=swiftshader --enable-unsafe-swiftshader").split()

QUADRANTS = {  # texture colours, one per quarter of every face
    "red": (220, 35, 35),
    "blue": (35, 70, 225),
    "green": (40, 180, 60),
    "yellow": (240, 200, 30),
}


# -- fixtures: a real GLB, sharded and published into a local store ---------------------------
def textured_box_glb(path: Path) -> Path:
    """A 1 × 0.8 × 0.6 box, every face showing a 4-colour texture (so texturing is exercised)."""
    import trimesh
    from PIL import Image

    size = 64
    img = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    img[:h, :h], img[:h, h:], img[h:, :h], img[h:, h:] = (np.array(c) for c in QUADRANTS.values())
    box = trimesh.creation.box(extents=(1.0, 0.8, 0.6))
    # One set of 4 vertices per face so each face gets the whole texture.
    vertices, faces, uv = [], [], []
    for tri_pair in box.faces.reshape(-1, 2, 3):
        quad = list(dict.fromkeys(tri_pair.ravel().tolist()))
        corners = box.vertices[quad]
        normal = np.cross(corners[1] - corners[0], corners[2] - corners[0])
        axes = [i for i in range(3) if abs(normal[i]) < 1e-9]
        lo, hi = corners[:, axes].min(0), corners[:, axes].max(0)
        base = len(vertices)
        vertices += corners.tolist()
        uv += ((corners[:, axes] - lo) / (hi - lo)).tolist()
        index = {v: base + i for i, v in enumerate(quad)}
        faces += [[index[v] for v in tri] for tri in tri_pair.tolist()]
    mesh = trimesh.Trimesh(np.array(vertices), np.array(faces), process=False)
    mesh.fix_normals()
    mesh.visual = trimesh.visual.TextureVisuals(uv=np.array(uv), image=Image.fromarray(img))
    mesh.export(path)
    return path


def tiny_usdz(path: Path) -> Path:
    """A USDZ (an uncompressed zip of one USDA layer: a cube) to stand for the model's iOS version."""
    usda = '#usda 1.0\n(\n    defaultPrim = "Box"\n    metersPerUnit = 1\n    upAxis = "Y"\n)\n\ndef Cube "Box"\n{\n    double size = 0.8\n}\n'
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as usdz:
        usdz.writestr("box.usda", usda)
    return path


def publish(store: LocalStore, unique_id: str, glb: Path, work: Path, part_bytes: int, usdz: Path | None = None) -> dict:
    """Shard ``glb`` as the web asset (and ``usdz`` for iOS), upload parts, then the manifest
    (tasks/upload.py's order)."""
    out = work / unique_id
    out.mkdir(parents=True)
    entry = split_file(glb, out, part_bytes)
    entry["role"] = "web"
    entries = [entry]
    if usdz is not None:
        entries.append({**split_file(usdz, out, max(64, usdz.stat().st_size // 2 + 1)), "role": "usdz"})
    manifest_path = write_manifest(entries, unique_id, out / MANIFEST_NAME, {"part_bytes": part_bytes})
    for part in (p for e in entries for p in e["parts"]):
        store.put_object(f"models/{unique_id}/{part['name']}", out / part["name"])
    store.put_object(f"models/{unique_id}/{MANIFEST_NAME}", manifest_path, "application/json")
    return json.loads(manifest_path.read_text())


def add_product(store: LocalStore, tmp: Path, unique_id: str, title: str):
    video = tmp / f"{unique_id}.mp4"
    video.write_bytes(b"not really a video")
    return store.enqueue(title, "others", video, unique_id=unique_id)


@pytest.fixture()
def shop(tmp_path):
    """A store with products in every state; ``box`` (with a USDZ) and ``holey`` are DONE with real GLBs."""
    root = tmp_path / "store"
    store = LocalStore(StorageSettings(backend="local", root=str(root), bucket=BUCKET))
    glb = textured_box_glb(tmp_path / "box.glb")
    usdz = tiny_usdz(tmp_path / "box.usdz")
    part_bytes = max(512, glb.stat().st_size // 4 + 1)  # 4 parts
    manifests = {}
    for uid, title in [("box", "Colour box <b>&amp;</b>"), ("holey", "Box with a missing part")]:
        add_product(store, tmp_path, uid, title)
        manifests[uid] = publish(store, uid, glb, tmp_path / "shards", part_bytes, usdz if uid == "box" else None)
        store.claim(uid, "test", 60)
        store.mark_done(uid, f"models/{uid}/{MANIFEST_NAME}")
    # A thumbnail for the gallery: any PNG next to the model.
    from PIL import Image

    thumb = tmp_path / "preview.png"
    Image.new("RGB", (64, 64), QUADRANTS["red"]).save(thumb)
    store.put_object("models/box/preview.png", thumb, "image/png")
    # The missing part: the manifest lists it, the bucket lacks it.
    store.object_path(f"models/holey/{manifests['holey']['assets'][0]['parts'][2]['name']}").unlink()
    add_product(store, tmp_path, "queued", "Still in the queue")
    add_product(store, tmp_path, "busy", "Being processed")
    store.claim("busy", "worker-1", 600)
    add_product(store, tmp_path, "broken", "Failed basket")
    store.claim("broken", "worker-1", 600)
    store.mark_failed("broken", "COLMAP registered 3 of 120 frames")
    # A model left in the bucket by an earlier run of a product now back in the queue.
    shutil.copytree(root / BUCKET / "models" / "box", root / BUCKET / "models" / "queued")
    return store, manifests, glb


@pytest.fixture()
def server(shop):
    store = shop[0]
    srv = make_server(store.root, BUCKET, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(srv, path: str, method: str = "GET", headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    conn.request(method, path, headers=headers or {})
    res = conn.getresponse()
    body = res.read()
    conn.close()
    return res.status, dict(res.getheaders()), body


# -- the server ---------------------------------------------------------------------------------
def test_api_lists_products_with_status_and_thumbnail(server):
    status, headers, body = get(server, "/api/products")
    assert status == 200 and headers["Content-Type"] == "application/json"
    products = {p["unique_id"]: p for p in json.loads(body)}
    assert set(products) == {"box", "holey", "queued", "busy", "broken"}
    assert products["box"] == {
        "unique_id": "box",
        "title": "Colour box <b>&amp;</b>",
        "status": "DONE",
        "error": None,
        "thumbnail": "/store/models/box/preview.png",
    }
    assert products["broken"]["status"] == "FAILED" and "COLMAP" in products["broken"]["error"]
    assert products["busy"]["status"] == "PROCESSING" and products["queued"]["status"] == "IDLE"
    assert products["holey"]["thumbnail"] is None


def test_store_serves_done_models_only(server, shop):
    store, manifests, glb = shop
    status, headers, body = get(server, "/store/models/box/manifest.json")
    assert status == 200 and json.loads(body) == manifests["box"]
    assert headers["Content-Type"] == "application/json"
    parts = manifests["box"]["assets"][0]["parts"]
    assert len(parts) >= 3
    joined = b"".join(get(server, f"/store/models/box/{p['name']}")[2] for p in parts)
    assert joined == glb.read_bytes()
    status, headers, _ = get(server, f"/store/models/box/{parts[0]['name']}", "HEAD")
    assert status == 200 and int(headers["Content-Length"]) == parts[0]["size"]
    # Revalidation: unchanged parts come back as 304.
    status, _, body = get(server, "/store/models/box/manifest.json", headers={"If-None-Match": headers["ETag"]})
    assert status == 200  # a different object's ETag does not match
    etag = get(server, "/store/models/box/manifest.json")[1]["ETag"]
    assert get(server, "/store/models/box/manifest.json", headers={"If-None-Match": etag})[0] == 304

    refused = [
        "/store/models/queued/manifest.json",  # its objects exist, but the product is IDLE
        "/store/models/busy/manifest.json",
        "/store/models/broken/manifest.json",
        "/store/models/nobody/manifest.json",
        "/store/videos/box/box.mp4",  # exists, but not under models/
        "/store/models/box/../../videos/box/box.mp4",
        "/store/models/box/%2e%2e/queued/manifest.json",
        "/store/models/box",
        "/store/models/box/",
        "/store/models/box/.part-tmp",
        "/store/../products.sqlite3",
        "/products.sqlite3",
        "/../flows/viewer_server.py",
        "/api/products/box",
    ]
    assert store.object_exists("videos/box/box.mp4")
    for path in refused:
        assert get(server, path)[0] == 404, path


def test_server_is_read_only_and_loopback_only(server, shop):
    store = shop[0]
    before = store.db_path.read_bytes()
    for method in ("POST", "PUT", "DELETE"):
        assert get(server, "/api/products", method)[0] == 405
    # A page of another site that resolves its name to 127.0.0.1 (DNS rebinding) gets nothing.
    assert get(server, "/api/products", headers={"Host": "evil.example:80"})[0] == 421
    assert get(server, "/api/products", headers={"Host": f"localhost:{server.server_address[1]}"})[0] == 200
    assert store.db_path.read_bytes() == before
    status, headers, body = get(server, "/")
    assert status == 200 and b'id="products"' in body and "script-src 'self'" in headers["Content-Security-Policy"]
    # This server is the local store's: its pages read /api and /store, whatever lies in www/.
    status, headers, body = get(server, "/config.json")
    assert status == 200 and json.loads(body) == {"mode": "local"}


def test_empty_store_root_is_an_empty_gallery(tmp_path):
    srv = make_server(tmp_path / "no-store", BUCKET, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        assert get(srv, "/api/products")[2] == b"[]"
        assert get(srv, "/store/models/box/manifest.json")[0] == 404
        assert not (tmp_path / "no-store").exists()  # looking is not creating
    finally:
        srv.shutdown()
        srv.server_close()


# -- the pages, in Chromium -----------------------------------------------------------------------
def browser_skip_reason() -> str | None:
    """Why the browser tests cannot run here (None: they can). In CI (``CI`` set) they must run:
    a missing piece of the setup fails the test instead of skipping it."""
    reason = None
    if not shutil.which("node"):
        reason = "node is not installed (apt-get install nodejs npm; node >= 18)"
    elif not Path(CHROMIUM).exists():
        reason = f"Chromium is not installed at {CHROMIUM} (make system-deps, or apt-get install chromium)"
    elif not (VIEWER / "node_modules" / "playwright-core").is_dir():
        reason = "viewer/node_modules is missing (make setup, or cd viewer && npm ci)"
    elif not viewer_built():
        reason = "the viewer is not built (cd viewer && npm ci && npm run build)"
    if reason and os.environ.get("CI"):
        pytest.fail(f"the viewer's browser test must run in CI, but {reason}")
    return reason


def run_browser(server, scenarios: list[dict], tmp_path: Path, tag: str, base_url: str | None = None,
                allowed_origins: list[str] = ()) -> dict:
    """Run ``scenarios`` in headless Chromium against ``server`` (or ``base_url``); the script's report."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    plan = {
        "base_url": base_url or f"http://127.0.0.1:{server.server_address[1]}/",
        "out_dir": str(ARTIFACTS),
        "chromium": CHROMIUM,
        "extra_args": GL_ARGS,
        "allowed_origins": list(allowed_origins),
        "timeout_ms": 90_000,
        "scenarios": scenarios,
    }
    plan_file = tmp_path / f"plan-{tag}.json"
    plan_file.write_text(json.dumps(plan))
    done = subprocess.run(
        ["node", str(BROWSER_SCRIPT), str(plan_file)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, f"browser script failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (ARTIFACTS / f"report-{tag}.json").write_text(json.dumps(report, indent=1))
    return report


def non_background_fraction(png: Path, background=BACKGROUND, tol: int = 30) -> float:
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return float((np.abs(img - np.array(background)).max(axis=2) > tol).mean())


def has_hue(png: Path, channel: int, margin: int = 60) -> bool:
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    others = np.delete(img, channel, axis=2).max(axis=2)
    return bool(((img[..., channel] - others) > margin).mean() > 0.002)


def test_pages_in_chromium(server, shop, tmp_path):
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    store, manifests, _ = shop
    started = time.time()
    report = run_browser(
        server,
        [
            {"name": "gallery", "path": "/", "screenshot": "gallery.png"},
            {"name": "box", "path": "/product.html?id=box", "screenshot": "product-box.png"},
            {"name": "box-ios", "path": "/product.html?id=box", "emulate_ios": True},
            {"name": "holey", "path": "/product.html?id=holey", "screenshot": "product-missing-part.png"},
            {"name": "queued", "path": "/product.html?id=queued", "screenshot": "product-queued.png"},
            {"name": "busy", "path": "/product.html?id=busy"},
            {"name": "broken", "path": "/product.html?id=broken", "screenshot": "product-failed.png"},
            {"name": "nobody", "path": "/product.html?id=nobody"},
            {"name": "bad-id", "path": "/product.html?id=../x"},
        ],
        tmp_path,
        "main",
    )
    results = {r["name"]: r for r in report["results"]}
    webgl = report.get("webgl_renderer")

    assert results["gallery"]["state"] == "loaded" and results["gallery"]["cards"] == 5
    assert results["gallery"]["thumbs"] == 1  # box's preview.png; the others keep a placeholder

    box = results["box"]
    assert box["state"] == "loaded", f"{box['message']} (WebGL: {webgl}; console: {box['console_errors']})"
    assert box["model_visible"] is True
    assert box["badge"] == {"text": "3D model ready", "status": "DONE"}
    assert box["title"].startswith("Colour box <b>&amp;</b>")  # the title is text, not markup
    assert box["poster"].endswith("/store/models/box/preview.png")  # the poster while parts download
    shot = Path(box["screenshot"])
    covered = non_background_fraction(shot)
    assert covered > 0.03, f"the model covers only {covered:.1%} of {shot} (WebGL: {webgl})"
    assert has_hue(shot, 0) and has_hue(shot, 2), f"no red/blue texture colours in {shot}"
    # AR: no Quick Look in desktop Chromium, so the USDZ is not even downloaded ...
    usdz = manifests["box"]["assets"][1]
    assert box["ar"] is None and not any(".usdz.part-" in r for r in box["requests"])
    # ... but where model-viewer would offer Quick Look, the verified USDZ becomes its ios-src.
    ios = results["box-ios"]
    assert ios["state"] == "loaded" and ios["model_visible"] is True, ios
    assert ios["ios"] == "ready" and ios["ar"] is True and ios["ios_src"].startswith("blob:"), ios
    assert ios["ios_sha256"] == usdz["sha256"]
    assert all(f"/store/models/box/{p['name']}" in ios["requests"] for p in usdz["parts"])

    assert results["holey"]["state"] == "error"
    assert "missing" in results["holey"]["message"]
    assert manifests["holey"]["assets"][0]["parts"][2]["name"] in results["holey"]["message"]
    assert results["holey"]["badge"] == {"text": "3D model unavailable", "status": "UNAVAILABLE"}
    assert results["queued"]["state"] == "not-ready" and "waiting in the queue" in results["queued"]["message"]
    assert results["queued"]["badge"]["status"] == "IDLE"
    assert results["busy"]["state"] == "not-ready" and "being turned into a 3D model" in results["busy"]["message"]
    assert results["broken"]["state"] == "error" and "COLMAP registered 3 of 120 frames" in results["broken"]["message"]
    assert results["broken"]["badge"] == {"text": "Failed", "status": "FAILED"}
    assert results["nobody"]["state"] == "error" and "no product nobody" in results["nobody"]["message"]
    assert results["bad-id"]["state"] == "error" and "not a valid product id" in results["bad-id"]["message"]
    for r in results.values():
        assert r["foreign_requests"] == [], f"{r['name']} fetched off the server: {r['foreign_requests']}"
    print(f"\nviewer pages in {time.time() - started:.1f} s; WebGL: {webgl}; screenshots in {ARTIFACTS}")

    # Now corrupt one byte of one part on disk: the same page must refuse the model.
    part = manifests["box"]["assets"][0]["parts"][1]
    path = store.object_path(f"models/box/{part['name']}")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = run_browser(
        server, [{"name": "corrupt", "path": "/product.html?id=box", "screenshot": "product-corrupt.png"}], tmp_path, "corrupt"
    )
    corrupt = report["results"][0]
    assert corrupt["state"] == "error", corrupt
    assert "corrupt" in corrupt["message"] and part["name"] in corrupt["message"]
    # The badge above the error never says "ready".
    assert corrupt["badge"] == {"text": "3D model unavailable", "status": "UNAVAILABLE"}, corrupt["badge"]
    assert non_background_fraction(Path(corrupt["screenshot"])) > 0.005  # the message is on the page
