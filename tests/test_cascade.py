"""The model cascade (detector=auto|yolo|owlvit, segmenter=sam|auto) through real model classes with random weights.

Nothing downloads: YOLO is built from its ultralytics model yaml, OWL-ViT from a tiny
``OwlViTConfig`` with a CLIP tokenizer over a vocabulary written in ``tools.random_weights``, SAM
from ``segment_anything``'s classes (a shrunk build registered next to ``vit_b``; ``vit_b`` itself
in one slow test). They are saved into a weights folder in the production layout and loaded by
the production loaders. Random outputs mean nothing, so the tests check the wiring (shapes,
frame-pixel xyxy boxes, batching, thresholds, masks at frame size, the fall-through order); the
cascade's geometry (boxes on a few frames carried to all) is checked with a stand-in detector
that returns the true boxes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.isolation_weights import offline_model_environment

offline_model_environment()  # before any model library is imported: no hub, no ultralytics settings in ~
pytest.importorskip("pyrender")
pytest.importorskip("ultralytics")
pytest.importorskip("transformers")
sam_build = pytest.importorskip("segment_anything.build_sam")

from flows.config import compose_config  # noqa: E402
from tasks import detect_cascade, detect_models, isolation_geometry as geo, segment, segment_sam  # noqa: E402
from tasks.detect import detect_product, detector_settings  # noqa: E402
from tasks.detect_models import Candidates, matching_classes  # noqa: E402
from tasks.isolation_weights import MissingWeights  # noqa: E402
from tools import random_weights  # noqa: E402
from tests.rig_fixtures import render_rig_fixture  # noqa: E402

FRAMES, WIDTH, HEIGHT = 12, 160, 120
TINY_SAM = "korokoro_test_tiny"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """A 12-frame basket turntable (160x120) with true cameras, points and masks."""
    return render_rig_fixture("basket", tmp_path_factory.mktemp("cascade"), frames=FRAMES, width=WIDTH, height=HEIGHT)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights folder with random YOLOv8n, a tiny OWL-ViT snapshot and a tiny SAM checkpoint."""
    folder = tmp_path_factory.mktemp("weights")
    random_weights.write_random_yolo(folder, "yolov8n.pt")
    random_weights.write_random_owlvit(folder, "owlvit-tiny", random_weights.tiny_owlvit_config())
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sam_build.sam_model_registry, TINY_SAM, random_weights.tiny_sam_builder)
        random_weights.write_random_sam(folder, "sam-tiny.pth", TINY_SAM)
        yield folder


def _config(weights: Path, *overrides: str) -> dict:
    return compose_config([f"weights_dir={weights}", "detector.yolo_weights=yolov8n.pt",
                           "detector.owlvit_weights=owlvit-tiny", "segmenter.sam_checkpoint=sam-tiny.pth",
                           f"segmenter.sam_model_type={TINY_SAM}", *overrides])


def _frames(rig, count: int = 3) -> list[np.ndarray]:
    views = geo.load_views(rig[0].transforms)
    return [geo.read_image(p) for p in views.images[:count]]


# --------------------------------------------------------------------------- the model wrappers


def test_coco_classes_are_matched_as_whole_words():
    names = random_weights.coco_names()
    assert len(names) == 80
    assert matching_classes(names, "cup Red Cup") == [41]
    assert matching_classes(names, "others Teddy bear, brown") == [77]
    assert matching_classes(names, "others wicker basket") == []
    assert matching_classes(names, "cupboard") == []  # "cup" only as a word
    assert detect_models.product_words("others wicker basket") == "wicker basket"
    assert detect_models.product_words("cup red mug") == "cup red mug"


def test_yolo_boxes_are_frame_pixels_and_batching_does_not_mix_frames(rig, weights):
    settings = detector_settings(_config(weights, "detector=yolo", "detector.yolo_confidence=0.0")["detector"])
    frames = _frames(rig)  # a video's frames share one size (ultralytics pads a mixed batch differently)
    together = detect_models.find_yolo(frames, replace(settings, batch_size=3), "", forced=True)
    alone = detect_models.find_yolo(frames, replace(settings, batch_size=1), "", forced=True)
    frames.append(cv2.resize(frames[0], (2 * WIDTH, 2 * HEIGHT)))
    together += detect_models.find_yolo(frames[-1:], settings, "", forced=True)
    alone.append(together[-1])
    assert len(together) == len(frames)
    for frame, found, single in zip(frames, together, alone):
        h, w = frame.shape[:2]
        assert len(found.scores) > 0, "a zero threshold lets random outputs through"
        assert found.boxes.shape == (len(found.scores), 4) and found.boxes.dtype == np.float64
        assert np.all(np.diff(found.scores) <= 0), "best first"
        assert np.all(found.boxes[:, :2] <= found.boxes[:, 2:]) and np.all(found.boxes >= 0)
        assert np.all(found.boxes[:, [0, 2]] <= w) and np.all(found.boxes[:, [1, 3]] <= h)
        np.testing.assert_allclose(found.boxes, single.boxes, atol=1e-3)
        np.testing.assert_allclose(found.scores, single.scores, atol=1e-4)
    # The 2x frame's boxes reach past the 1x frame's size: boxes are in each frame's own pixels.
    assert together[-1].boxes[:, 2].max() > WIDTH or together[-1].boxes[:, 3].max() > HEIGHT
    strict = detect_models.find_yolo(frames, replace(settings, yolo_confidence=1.0), "", forced=True)
    assert all(len(c.scores) == 0 for c in strict)
    with pytest.raises(detect_models.Skipped, match="names none of the model's 80 classes"):
        detect_models.find_yolo(frames, settings, "others wicker basket", forced=False)


def test_owlvit_boxes_are_the_model_outputs_in_frame_pixels(rig, weights):
    settings = detector_settings(_config(weights, "detector=owlvit", "detector.owlvit_threshold=0.0")["detector"])
    frames = _frames(rig, 2) + [cv2.resize(_frames(rig, 1)[0], (2 * WIDTH, 3 * HEIGHT))]  # another shape in the batch
    found = detect_models.find_owlvit(frames, replace(settings, batch_size=2), "others wicker basket", forced=False)
    model, processor = detect_models.load_owlvit(Path(weights) / "owlvit-tiny", "cpu")
    outputs = detect_models.owlvit_outputs(model, processor, frames, "wicker basket", "cpu")
    patches = (64 // 16) ** 2
    assert outputs.pred_boxes.shape == (len(frames), patches, 4)
    for k, (frame, cand) in enumerate(zip(frames, found)):
        h, w = frame.shape[:2]
        cx, cy, bw, bh = outputs.pred_boxes[k].numpy().T  # normalised centre, size
        expected = np.clip(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) * [w, h, w, h], 0, [w, h, w, h])
        scores = 1 / (1 + np.exp(-outputs.logits[k, :, 0].numpy()))
        order = np.argsort(-scores, kind="stable")
        assert len(cand.scores) == patches, "a zero threshold keeps every patch's box"
        np.testing.assert_allclose(cand.scores, scores[order], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(cand.boxes, expected[order], atol=1e-3)
    top = float(max(c.scores.max() for c in found))
    above = detect_models.find_owlvit(frames, replace(settings, owlvit_threshold=top), "wicker basket", forced=True)
    assert all(len(c.scores) == 0 for c in above)
    with pytest.raises(detect_models.Skipped, match="no product name"):
        detect_models.find_owlvit(frames, settings, "others", forced=False)


def test_prompt_points_use_seeds_inside_the_box_spread_out():
    detection = {"box": [10, 10, 50, 50],
                 "seeds_fg": [[30, 30], [31, 30], [12, 12], [48, 48], [48, 12], [70, 70]],
                 "seeds_bg": [[5, 5], [20, 45], [90, 90]]}
    coords, labels = segment_sam.prompt_points(detection, 3, 2)
    assert labels.tolist() == [1, 1, 1, 0]
    assert coords[0].tolist() == [31, 30]  # nearest the seeds' median first
    assert {tuple(c) for c in coords[1:3].tolist()} <= {(12, 12), (48, 48), (48, 12)}  # then the farthest ones
    assert coords[3].tolist() == [20, 45]  # the only background seed inside the box


def test_sam_masks_are_frame_sized_batched_and_thresholded(rig, weights):
    settings = segment.segmenter_settings(_config(weights, "segmenter=sam")["segmenter"])
    boxes = json.loads(Path(_cv2_detections(rig).boxes).read_text())["frames"][:3]
    frames = _frames(rig)
    big = cv2.resize(frames[0], (2 * WIDTH, 2 * HEIGHT))
    frames, boxes = frames + [big], boxes + [{**boxes[0], "box": [2 * v for v in boxes[0]["box"]], "seeds_fg": [],
                                               "seeds_bg": []}]
    model = segment_sam.load_sam(Path(weights) / "sam-tiny.pth", TINY_SAM, "cpu")
    args = ([np.asarray(b["box"]) for b in boxes], [segment_sam.prompt_points(b, 3, 2) for b in boxes])
    batched = segment_sam.sam_predict(model, frames, *args, replace(settings, sam_batch_size=3), "cpu")
    single = segment_sam.sam_predict(model, frames, *args, replace(settings, sam_batch_size=1), "cpu")
    for frame, (mask, iou), (mask1, iou1) in zip(frames, batched, single):
        assert mask.shape == frame.shape[:2] and mask.dtype == bool
        assert np.array_equal(mask, mask1) and iou == pytest.approx(iou1, abs=1e-5)
    # Thresholds: let every random mask through, or none (then those frames get GrabCut's mask).
    loose = segment_sam.sam_first_pass(frames[:3], boxes[:3], replace(settings, min_predicted_iou=-1.0, min_seed_coverage=0.0))
    assert loose.sources == ["sam"] * 3
    strict = segment_sam.sam_first_pass(frames[:3], boxes[:3], replace(settings, min_predicted_iou=1.01))
    assert all(s.startswith("grabcut (sam: predicted IoU") for s in strict.sources)
    cv2_first = segment.grabcut_frames(frames[:3], boxes[:3], settings)
    assert all(np.array_equal(a, b) for a, b in zip(strict.masks, cv2_first.masks))


@pytest.mark.slow
def test_sam_vit_b_from_the_registry_runs_on_a_frame(rig):
    """The real ViT-B architecture, random weights (12 s a frame on two CPU cores)."""
    model = sam_build.sam_model_registry["vit_b"](checkpoint=None)
    boxes = json.loads(Path(_cv2_detections(rig).boxes).read_text())["frames"][:1]
    settings = segment.segmenter_settings(compose_config(["segmenter=sam"])["segmenter"])
    first = segment_sam.sam_first_pass(_frames(rig, 1), boxes, replace(settings, min_predicted_iou=-1.0,
                                                                      min_seed_coverage=0.0), model=model)
    assert first.sources == ["sam"] and first.masks[0].shape == (HEIGHT, WIDTH) and first.masks[0].dtype == bool


# --------------------------------------------------------------------------- weights and the cascade's order


def _cv2_detections(rig):
    root = Path(rig[0].dir).parent / "cv2-detect"
    if not (root / "boxes.json").exists():
        return detect_product(rig[0], root, detector_settings(compose_config(["detector=cv2"])["detector"]), "fp")
    from tasks.types import Detections

    return Detections(dir=root, boxes=root / "boxes.json", detector="cv2", found=FRAMES, total=FRAMES, fingerprint="fp")


def test_auto_without_weights_is_the_weight_free_path_with_one_log_line(rig, tmp_path, caplog):
    empty = tmp_path / "no-weights"
    cfg = compose_config([f"weights_dir={empty}"])
    with caplog.at_level(logging.WARNING):
        det = detect_product(rig[0], tmp_path / "detect", detector_settings(cfg["detector"]), "fp", query="cup red cup")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("tasks.")]
    assert len(lines) == 1 and str(empty) in lines[0] and "weight-free cv2 detector" in lines[0]
    boxes = json.loads(Path(det.boxes).read_text())
    reference = json.loads(Path(_cv2_detections(rig).boxes).read_text())
    assert det.detector == boxes["detector"] == "cv2" and boxes["requested"] == "auto"
    assert [a["outcome"] for a in boxes["attempts"]] == ["no weights", "no weights"]
    assert boxes["frames"] == reference["frames"] and boxes["aabb"] == reference["aabb"]
    caplog.clear()
    images = _frames(rig, FRAMES)
    entries = reference["frames"]
    with caplog.at_level(logging.WARNING):
        first = segment.get_segmenter("auto")[1](images, entries, segment.segmenter_settings(cfg["segmenter"]))
    assert len(caplog.records) == 1 and "no SAM checkpoint" in caplog.records[0].getMessage()
    assert first.sources == ["grabcut"] * FRAMES


@pytest.mark.parametrize("choice,name,where", [
    ("detector=yolo", "yolov8x.pt", "https://github.com/ultralytics/assets/releases/download/"),
    ("detector=owlvit", "owlvit-base-patch32", "google/owlvit-base-patch32"),
])
def test_forced_detector_without_weights_names_file_path_and_source(rig, tmp_path, choice, name, where):
    cfg = compose_config([f"weights_dir={tmp_path}", choice])
    with pytest.raises(MissingWeights) as error:
        detect_product(rig[0], tmp_path / "detect", detector_settings(cfg["detector"]), "fp", query="others red cup")
    assert str(tmp_path / name) in str(error.value) and where in str(error.value)


def test_forced_sam_without_weights_names_file_path_and_source(rig, tmp_path):
    cfg = compose_config([f"weights_dir={tmp_path}", "segmenter=sam"])
    with pytest.raises(MissingWeights, match=r"sam_vit_b_01ec64\.pth.*dl\.fbaipublicfiles\.com/segment_anything"):
        segment.segment_product(rig[0], _cv2_detections(rig), tmp_path / "segment",
                                segment.segmenter_settings(cfg["segmenter"]), "fp")


def test_cascade_falls_through_yolo_then_owlvit_to_cv2(rig, weights, tmp_path):
    """COCO product: YOLO first; thresholds that filter all send it on to OWL-ViT, then to cv2."""
    cfg = _config(weights, "detector.yolo_confidence=1.0", "detector.owlvit_threshold=1.0")
    det = detect_product(rig[0], tmp_path / "detect", detector_settings(cfg["detector"]), "fp", query="cup red cup")
    boxes = json.loads(Path(det.boxes).read_text())
    assert boxes["detector"] == "cv2"
    assert [(a["detector"], a["frames"], a["frames_with_box"], a["candidates"]) for a in boxes["attempts"]] == [
        ("yolo", 8, 0, 0), ("owlvit", 8, 0, 0)]
    assert boxes["frames"] == json.loads(Path(_cv2_detections(rig).boxes).read_text())["frames"]
    # Not a COCO product: YOLO is skipped; a zero threshold lets every OWL-ViT patch through (16 per frame),
    # and asking for more agreeing frames than were looked at still ends in cv2.
    cfg = _config(weights, "detector.owlvit_threshold=0.0", "detector.min_detected_frames=9")
    det = detect_product(rig[0], tmp_path / "detect2", detector_settings(cfg["detector"]), "fp", query="others wicker basket")
    attempts = json.loads(Path(det.boxes).read_text())["attempts"]
    assert attempts[0]["detector"] == "yolo" and attempts[0]["outcome"].startswith("skipped")
    assert (attempts[1]["frames_with_box"], attempts[1]["candidates"]) == (8, 8 * 16)
    assert det.detector == "cv2"


def _true_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)


def test_boxes_from_a_few_frames_reach_every_frame(rig, tmp_path, monkeypatch):
    """A stand-in model that sees the true boxes (plus a brighter distractor off-centre, and one
    wrong box) on the subset: the cascade keeps the product's box, drops the wrong one, and the
    cameras carry the rest to every frame."""
    camera_rig, truth = rig
    views = geo.load_views(camera_rig.transforms)
    true_masks = truth.load_masks()
    index = {str(p): i for i, p in enumerate(views.images)}
    calls = []

    def stand_in(images, settings, query, forced):
        calls.append(len(images))
        out = []
        for k, image in enumerate(images):
            i = next(i for p, i in index.items() if np.array_equal(image, geo.read_image(Path(p))))
            box = _true_box(true_masks[i])
            if k == 2:
                box = box + [60, 40, 60, 40]  # one wrong box, elsewhere in the frame
            distractor = np.array([0, 0, 12, 12], dtype=np.float64)
            out.append(Candidates.from_arrays([distractor, box], [0.9, 0.6], WIDTH, HEIGHT))
        return out

    monkeypatch.setitem(detect_models.FINDERS, "yolo", stand_in)
    settings = detector_settings({**compose_config(["detector=yolo"])["detector"], "weights_dir": str(tmp_path)})
    (tmp_path / settings.yolo_weights).touch()  # the stand-in needs no weights, but the cascade checks for them
    det = detect_product(camera_rig, tmp_path / "detect", settings, "fp", query="cup")
    boxes = json.loads(Path(det.boxes).read_text())
    subset = set(detect_cascade.subset_indices(views, settings.detect_frames).tolist())
    assert calls == [8] and det.detector == "yolo" and det.found == FRAMES
    (attempt,) = boxes["attempts"]
    assert attempt["frames_with_box"] == 8 and attempt["frames_agreeing"] == 7
    sources = [f["source"] for f in boxes["frames"]]
    assert sum(s == "yolo" for s in sources) == 7 and sum(s == "yolo-propagated" for s in sources) == FRAMES - 7
    assert {i for i, s in enumerate(sources) if s == "yolo"} < subset
    ious = []
    for frame, mask in zip(boxes["frames"], true_masks):
        true_box, box = _true_box(mask), np.array(frame["box"])
        assert np.all(box[:2] <= true_box[:2] + 1) and np.all(box[2:] >= true_box[2:] - 1), (frame["source"], box, true_box)
        ious.append(detect_cascade.box_iou(box[None], true_box[None])[0])
    # Carried boxes are loose where the kept views leave a wide gap (the dropped one), and every box
    # has the detector's 3 px margin (on a ~40 px product).
    assert min(ious) > 0.45 and np.median(ious) > 0.6, np.round(ious, 3)
    for frame in boxes["frames"]:
        box = np.array(frame["box"])
        seeds = np.array(frame["seeds_fg"]).reshape(-1, 2)
        assert len(seeds) and np.all((seeds >= box[:2]) & (seeds <= box[2:]))
    lo, hi = np.array(boxes["aabb"])
    assert np.all(lo <= truth.object_aabb[0] + 0.02) and np.all(hi >= truth.object_aabb[1] - 0.02)
    assert boxes["floor_z"] == pytest.approx(truth.floor_z, abs=0.02)


def test_boxes_that_disagree_are_not_used(rig, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def scattered(images, settings, query, forced):
        corners = rng.uniform([0, 0], [WIDTH - 20, HEIGHT - 20], size=(len(images), 2))
        return [Candidates.from_arrays([[x, y, x + 20, y + 20]], [0.9], WIDTH, HEIGHT) for x, y in corners]

    monkeypatch.setitem(detect_models.FINDERS, "owlvit", scattered)
    settings = detector_settings({**compose_config(["detector=owlvit"])["detector"], "weights_dir": str(tmp_path)})
    random_weights.write_random_owlvit(tmp_path, settings.owlvit_weights, random_weights.tiny_owlvit_config())
    with pytest.raises(ValueError, match="detector=owlvit did not find the product .*owlvit_threshold"):
        detect_product(rig[0], tmp_path / "detect", settings, "fp", query="wicker basket")


# --------------------------------------------------------------------------- end to end


def test_cascade_end_to_end_with_random_models(rig, weights, tmp_path):
    """detector=auto + segmenter=sam on random models: wherever SAM's random masks are not trusted the
    frame gets GrabCut's, and the stage's masks are then exactly the weight-free path's."""
    camera_rig, truth = rig
    cfg = _config(weights, "segmenter=sam", "detector.yolo_confidence=1.0", "detector.owlvit_threshold=1.0")
    det = detect_product(camera_rig, tmp_path / "detect", detector_settings(cfg["detector"]), "fp", query="cup")
    strict = replace(segment.segmenter_settings(cfg["segmenter"]), min_predicted_iou=1.01)
    masks = segment.segment_product(camera_rig, det, tmp_path / "segment", strict, "fp")
    stats = json.loads(Path(masks.stats).read_text())
    assert stats["first_pass_counts"] == {"grabcut": FRAMES}
    assert all(f["first_pass"].startswith("grabcut (sam: predicted IoU") for f in stats["frames"])
    reference = segment.segment_product(camera_rig, det, tmp_path / "segment-cv2",
                                        segment.segmenter_settings(compose_config(["segmenter=cv2"])["segmenter"]), "fp")
    read = lambda d: [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((Path(d) / "masks").glob("*.png"))]  # noqa: E731
    ours, theirs = read(masks.dir), read(reference.dir)
    assert len(ours) == FRAMES and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    ious = [geo.mask_iou(m > 127, t) for m, t in zip(ours, truth.load_masks())]
    assert np.median(ious) >= 0.95 and min(ious) >= 0.85, ious


def test_weights_command_lists_each_choice(weights, tmp_path, monkeypatch, capsys):
    import sys

    from flows import cli

    monkeypatch.setenv("KOROKORO_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(sys, "argv", ["korokoro"])
    with pytest.raises(SystemExit) as done:
        cli.main(["weights", f"weights_dir={weights}", "detector.yolo_weights=yolov8n.pt"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert f"weights folder: {weights}" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("detector=", "segmenter="))}
    assert set(rows) == {f"detector={n}" for n in ("cv2", "yolo", "owlvit", "auto")} | {
        f"segmenter={n}" for n in ("cv2", "sam", "auto")}
    assert rows["detector=yolo"].rstrip().endswith("present")
    assert "MISSING" in rows["detector=owlvit"] and "MISSING" in rows["segmenter=sam"]
    assert rows["detector=auto"].rstrip().endswith("uses yolo then cv2")
    assert "hf download google/owlvit-base-patch32" in out and "sam_vit_b_01ec64.pth" in out
