"""Hydra multirun experiments: one comparison table across the jobs of a sweep.

``korokoro --multirun run video=mug.mp4 nerf.steps=2000,4000 mesh=web,full`` runs each job as a
``reconstruct-product`` flow run (caching makes a job reuse every stage its settings share with
an earlier one). After each job its run summary is read at once (the jobs of one video share a
work folder and overwrite its report); at the end ``comparison.md`` and ``comparison.csv`` go
into the sweep directory: one row per job with the swept settings, status, run time, training
time, held-out PSNR, triangles and GLB size.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

COLUMNS = (
    ("status", "status"),
    ("run_seconds", "run s"),
    ("train_seconds", "train s"),
    ("psnr_holdout_db", "PSNR dB"),
    ("triangles", "triangles"),
    ("glb_mib", "GLB MiB"),
    ("error", "error"),
)


@dataclass
class SweepTable:
    """The rows of one sweep, added job by job."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, job: int, overrides: Sequence[str], result: Any) -> None:
        """Record a finished job: its number, its Hydra overrides and its ``ProductResult``."""
        try:
            summary = json.loads((Path(result.report).parent / "report.json").read_text()).get("summary") or {}
        except (OSError, ValueError):
            summary = {}
        glb = summary.get("glb_bytes")
        self.rows.append(
            {
                "job": job,
                "overrides": dict(_split(o) for o in overrides),
                "unique_id": result.unique_id,
                "status": result.status,
                "error": result.error or "",
                **{k: summary.get(k) for k in ("run_seconds", "train_seconds", "psnr_holdout_db", "triangles")},
                "glb_mib": round(glb / 2**20, 3) if glb else None,
            }
        )

    def swept_keys(self) -> list[str]:
        """The override keys whose value differs between jobs (the experiment's variables)."""
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row["overrides"] if k not in keys]
        return [k for k in keys if len({row["overrides"].get(k) for row in self.rows}) > 1]

    def write(self, sweep_dir: Path) -> tuple[Path, Path]:
        """``comparison.md`` and ``comparison.csv`` in ``sweep_dir``; returns both paths."""
        sweep_dir = Path(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        keys = self.swept_keys()
        header = ["job", *keys, *(title for _, title in COLUMNS)]
        table = [
            [row["job"], *(row["overrides"].get(k, "") for k in keys), *(_cell(row[name]) for name, _ in COLUMNS)]
            for row in self.rows
        ]
        csv_path = sweep_dir / "comparison.csv"
        with csv_path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(table)
        md_path = sweep_dir / "comparison.md"
        lines = [
            f"# Sweep comparison ({len(self.rows)} jobs)",
            "",
            "run s = this run's stage time (cached stages cost ~0); train s = the training time of the "
            "field this job used, from its metrics.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if h in ("status", "error", *keys) else "---:" for h in header) + "|",
        ]
        lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |" for cells in table]
        md_path.write_text("\n".join(lines) + "\n")
        return md_path, csv_path


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return value
