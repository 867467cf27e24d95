"""Line charts of chosen figures against one setting's value: one panel per figure, one line per field.

    python -m bench.sweep_figure --setting mesh.fusion.surface_opacity --out bench/figures/NAME.png \\
        --series "basket, call 1=bench/results/A-mesh-variants.json@0.3" \\
        --series "basket, call 3=bench/results/B-mesh-variants.json@0.1" --series "basket, call 3=bench/results/B.json@0.1" \\
        --figure fscore_1pct --figure chamfer_of_diag

Each ``--series`` is ``label=path[@preset]``: a ``bench.mesh_variants`` table (a list of rows) or
a ``bench.run_stages`` result (its ``quality`` block), and the setting's value wherever the run
does not override it (the table's "(preset)" row, the result itself). A table's rows that
override anything else are left out, so every point differs from its line's others in that one
setting. Repeating a label adds its points to the same line: one trained field, one line, so the
lines compare settings on the same field, not fields (runs of one seed differ by ~0.03 of F-score).
A dashed line marks the issue's bound where bench/targets.py has one for that figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

from bench.compare_figure import mark_bound, save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def sweep_points(setting: str, spec: str) -> tuple[str, list[tuple[float, dict]]]:
    """``label=path[@preset]`` → (label, [(the setting's value, figures)]). Raises ValueError naming
    a malformed spec, or a path whose runs never fix the setting (no ``@preset`` and no override)."""
    label, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"--series {spec!r}: expected label=path/to/results.json[@preset value]")
    path, at, preset = rest.rpartition("@") if "@" in rest else (rest, "", "")
    data = json.loads(Path(path).read_text())
    rows = data if isinstance(data, list) else [{"variant": "(preset)", **data["quality"]}]
    points = []
    for row in rows:
        overrides = dict(item.split("=", 1) for item in row["variant"].split() if row["variant"] != "(preset)")
        if set(overrides) - {setting}:
            continue
        value = overrides.get(setting, preset if at else None)
        if value is None:
            raise ValueError(f"--series {spec!r}: {path} has a run without {setting}; give its value as @preset")
        points.append((float(value), row))
    return label, points


def draw(series: dict[str, list[tuple[float, dict]]], setting: str, figures: list[str], title: str, out: Path) -> None:
    """One panel per figure; each series a line over the setting's values, sorted."""
    fig, axes = plt.subplots(1, len(figures), figsize=(4.2 * len(figures), 3.6), squeeze=False)
    for ax, key in zip(axes[0], figures):
        for label, points in series.items():
            pts = sorted((x, row[key]) for x, row in points if row.get(key) is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        mark_bound(ax, key)
        ax.set_xlabel(setting, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, title, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True, help="the Hydra key on the x axis, e.g. mesh.fusion.surface_opacity")
    parser.add_argument("--series", action="append", required=True, help="label=path[@preset] (repeatable)")
    parser.add_argument("--figure", action="append", required=True, help="a quality figure's key (repeatable)")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    series: dict[str, list[tuple[float, dict]]] = {}
    for spec in args.series:
        label, points = sweep_points(args.setting, spec)
        series.setdefault(label, []).extend(points)
    draw(series, args.setting, args.figure, args.title, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
