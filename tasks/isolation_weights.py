"""The weights folder of the model backends (YOLOv8, OWL-ViT, SAM): where each file lives, clear errors, no network.

Layout of the weights folder (``weights_dir`` in conf/config.yaml: ``$KOROKORO_WEIGHTS``, else
``~/.cache/korokoro/weights``). The names are settings (conf/detector/auto.yaml, conf/segmenter/sam.yaml)::

    <weights_dir>/
        yolov8x.pt                  detector=yolo|auto: an ultralytics checkpoint (COCO classes)
        owlvit-base-patch32/        detector=owlvit|auto: a Hugging Face snapshot folder:
            config.json                 the model's config,
            model.safetensors           its weights (or pytorch_model.bin),
            preprocessor_config.json    the image processor (processor_config.json as transformers 5 saves it),
            tokenizer.json              the CLIP tokenizer (or vocab.json + merges.txt),
            tokenizer_config.json ...   and its other tokenizer files
        sam_vit_b_01ec64.pth        segmenter=sam|auto: a segment-anything state dict

Nothing here downloads. A missing file raises :class:`MissingWeights` naming the file, the path
it was looked for at and where to get it; ``detector=auto`` / ``segmenter=auto`` treat that as
"this backend is not installed" and fall back to the weight-free path. ``korokoro weights``
prints :func:`weights_report`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


class MissingWeights(FileNotFoundError):
    """A backend's weights file is not in the weights folder."""


@dataclass(frozen=True)
class WeightFile:
    """One file (or Hugging Face snapshot folder) a backend loads, relative to the weights folder.

    ``parts``: for a folder, the files it must hold; ``a|b`` means either ``a`` or ``b``.
    ``source``: where it comes from (URL or hub id); ``fetch``: a command that puts it in place.
    """

    what: str
    name: str
    source: str
    fetch: str
    parts: tuple[str, ...] = ()

    def path(self, weights_dir: Path) -> Path:
        return Path(weights_dir) / self.name

    def missing(self, weights_dir: Path) -> list[str]:
        """What is absent (``[]`` when everything is in place)."""
        path = self.path(weights_dir)
        if not self.parts:
            return [] if path.is_file() else [self.name]
        if not path.is_dir():
            return [self.name + "/"]
        return [p for p in self.parts if not any((path / alt).is_file() for alt in p.split("|"))]


def weights_folder(setting: str | os.PathLike) -> Path:
    """The weights folder of a ``weights_dir`` setting (``~`` and ``$VARS`` expanded)."""
    return Path(os.path.expandvars(str(setting))).expanduser()


def require(weights: WeightFile, weights_dir: str | os.PathLike) -> Path:
    """The path of ``weights`` in ``weights_dir``; :class:`MissingWeights` when it is not complete there."""
    folder = weights_folder(weights_dir)
    missing = weights.missing(folder)
    if missing:
        raise MissingWeights(
            f"{weights.what} weights {weights.name!r} not found: expected {weights.path(folder)}"
            + (f" (missing {', '.join(missing)})" if weights.parts and missing != [weights.name + "/"] else "")
            + f". Get them from {weights.source}: {weights.fetch.format(dir=folder)}"
            " (or set weights_dir / KOROKORO_WEIGHTS to the folder that holds them; `korokoro weights` lists all)"
        )
    return weights.path(folder)


def yolo_weights(settings: Any) -> WeightFile:
    """The YOLOv8 checkpoint named by detector settings (``yolo_weights``, ``yolo_url``)."""
    return WeightFile("YOLOv8", settings.yolo_weights, settings.yolo_url, "curl -L -o {dir}/" + settings.yolo_weights
                      + f" {settings.yolo_url}")


def owlvit_weights(settings: Any) -> WeightFile:
    """The OWL-ViT snapshot folder named by detector settings (``owlvit_weights``, ``owlvit_hub_id``)."""
    return WeightFile(
        "OWL-ViT", settings.owlvit_weights, f"the Hugging Face hub ({settings.owlvit_hub_id})",
        f"hf download {settings.owlvit_hub_id} --local-dir {{dir}}/{settings.owlvit_weights}",
        parts=("config.json", "model.safetensors|pytorch_model.bin", "preprocessor_config.json|processor_config.json",
               "tokenizer.json|vocab.json", "tokenizer_config.json"),
    )


def sam_weights(settings: Any) -> WeightFile:
    """The Segment Anything checkpoint named by segmenter settings (``sam_checkpoint``, ``sam_url``)."""
    return WeightFile(f"Segment Anything ({settings.sam_model_type})", settings.sam_checkpoint, settings.sam_url,
                      "curl -L -o {dir}/" + settings.sam_checkpoint + f" {settings.sam_url}")


def offline_model_environment() -> None:
    """Keep the model libraries off the network and out of the home folder (call before importing them).

    Hugging Face reads only local files; ultralytics skips its online check, never auto-installs
    packages, and writes its settings file under the temporary folder instead of ``~/.config``.
    Values already set in the environment win.
    """
    scratch = Path(tempfile.gettempdir()) / f"korokoro-models-{os.getuid()}"
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "false",
        "YOLO_VERBOSE": "false",
        "YOLO_CONFIG_DIR": str(scratch / "ultralytics"),
        "MPLCONFIGDIR": str(scratch / "matplotlib"),
    }.items():
        os.environ.setdefault(key, value)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if device != "auto":
        return device
    import torch  # noqa: PLC0415

    return "cuda" if torch.cuda.is_available() else "cpu"


def weights_report(cfg: Mapping[str, Any]) -> str:
    """What each ``detector=`` / ``segmenter=`` choice needs and whether it is present (``korokoro weights``)."""
    from tasks.detect import detector_settings  # noqa: PLC0415 - the settings types live with their stages
    from tasks.segment import segmenter_settings  # noqa: PLC0415

    folder = weights_folder(cfg.get("weights_dir") or "~/.cache/korokoro/weights")
    # Whichever backend is selected, the auto settings name every file (yolo/owlvit/sam share them).
    det = detector_settings({**cfg.get("detector", {}), "name": "auto", "weights_dir": str(folder)})
    seg = segmenter_settings({**cfg.get("segmenter", {}), "name": "auto", "weights_dir": str(folder)})
    files = {"yolo": yolo_weights(det), "owlvit": owlvit_weights(det), "sam": sam_weights(seg)}
    missing = {k: f.missing(folder) for k, f in files.items()}

    def state(key: str) -> str:
        return "present" if not missing[key] else "MISSING " + ", ".join(missing[key])

    present = [k for k in ("yolo", "owlvit") if not missing[k]]
    lines = [f"weights folder: {folder}  (weights_dir; KOROKORO_WEIGHTS sets it)", ""]
    rows = [
        ("detector=cv2", "no weights (sparse points + cameras)", "ready"),
        ("detector=yolo", files["yolo"].name, state("yolo")),
        ("detector=owlvit", files["owlvit"].name + "/", state("owlvit")),
        ("detector=auto", "YOLO if the product is a COCO class, then OWL-ViT, then cv2",
         "uses " + (" then ".join(present + ["cv2"]))),
        ("segmenter=cv2", "no weights (GrabCut + visual hull)", "ready"),
        ("segmenter=sam", files["sam"].name, state("sam")),
        ("segmenter=auto", "SAM when present (and a GPU, unless auto_on_cpu), else cv2",
         "uses cv2" if missing["sam"] else "uses sam on a GPU" + ("" if seg.auto_on_cpu else ", cv2 on a CPU")),
    ]
    width = max(len(r[1]) for r in rows)
    lines += [f"{choice:16} {need:{width}}  {status}" for choice, need, status in rows]
    absent = [f for k, f in files.items() if missing[k]]
    if absent:
        lines += ["", "to fetch (on a machine with internet; nothing downloads at run time):"]
        lines += [f"  {f.what}: {f.fetch.format(dir=folder)}" for f in absent]
    return "\n".join(lines)
