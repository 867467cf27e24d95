"""The targets the issues set, checked against a ``bench.run_stages`` result.

Each target: the figure it reads, how it compares, the bound, and the issue it comes from.
Time targets are for one H100 (``profile=gpu``) or the 2-core machine (``profile=cpu``);
a run is checked against the ones for its profile.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Target:
    name: str
    read: Callable[[dict[str, Any]], float | None]
    compare: Callable[[float, float], bool]
    bound: float
    source: str
    profiles: tuple[str, ...] = ("gpu", "cpu")

    def check(self, result: dict[str, Any]) -> tuple[float | None, bool | None]:
        try:
            value = self.read(result)
        except (KeyError, TypeError):
            value = None
        return value, None if value is None else bool(self.compare(value, self.bound))


def _stage(name: str) -> Callable[[dict[str, Any]], float]:
    return lambda r: next(s["seconds"] for s in r["stages"] if s["stage"] == name)


@dataclass(frozen=True)
class QualityFigure:
    """Reads ``key`` of a result's ``quality`` block (the key stays visible, e.g. to charts)."""

    key: str

    def __call__(self, result: dict[str, Any]) -> float:
        return result["quality"][self.key]


def _quality(key: str) -> QualityFigure:
    return QualityFigure(key)


LE, GE = operator.le, operator.ge
TARGETS = (
    Target("all stages, s (H100)", lambda r: r["total_seconds"], LE, 120, "#9", ("gpu",)),
    Target("all stages, s (2 cores)", lambda r: r["total_seconds"], LE, 300, "#9", ("cpu",)),
    Target("train, s", _stage("train"), LE, 45, "#5", ("gpu",)),
    Target("mesh, s", _stage("mesh"), LE, 15, "#5", ("gpu",)),
    Target("train peak GPU, MB", lambda r: _stage_gpu(r, "train"), LE, 8192, "#5", ("gpu",)),
    Target("frames registered", lambda r: r["quality"]["registered"] / r["quality"]["frames"], GE, 0.95, "#3"),
    Target("rotation error, deg", _quality("rotation_error_deg_median"), LE, 0.5, "#3"),
    Target("position error / radius", _quality("position_error_of_radius_median"), LE, 0.01, "#3"),
    Target("mask IoU median", _quality("mask_iou_median"), GE, 0.95, "#4"),
    Target("mask IoU worst", _quality("mask_iou_worst"), GE, 0.85, "#4"),
    Target("held-out PSNR, dB", _quality("psnr_holdout_object"), GE, 30, "#5", ("gpu",)),
    Target("Chamfer / diagonal", _quality("chamfer_of_diag"), LE, 0.01, "#5", ("gpu",)),
    Target("F-score @ 1 %", _quality("fscore_1pct"), GE, 0.9, "#5", ("gpu",)),
    Target("triangles", _quality("triangles"), LE, 100_000, "#5"),
    Target("GLB bytes", _quality("glb_bytes"), LE, 3_000_000, "#5"),
)


def _stage_gpu(result: dict[str, Any], name: str) -> float:
    return next(s["peak_gpu_mb"] for s in result["stages"] if s["stage"] == name)


def check_targets(result: dict[str, Any], profile: str) -> list[dict[str, Any]]:
    """One row per target of ``profile``: name, value, bound, met (None when not measured), source."""
    rows = []
    for target in TARGETS:
        if profile not in target.profiles:
            continue
        value, met = target.check(result)
        sign = "≤" if target.compare is LE else "≥"
        rows.append({"target": target.name, "value": value, "bound": f"{sign} {target.bound:g}", "met": met,
                     "source": target.source})
    return rows


def targets_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | value | bound | met | issue |", "|---|---:|---|---|---|"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:,.0f}" if abs(r["value"]) >= 1000 else f"{r['value']:.4g}"
        met = {True: "yes", False: "**no**", None: "not measured"}[r["met"]]
        lines.append(f"| {r['target']} | {value} | {r['bound']} | {met} | {r['source']} |")
    return lines
