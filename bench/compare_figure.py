"""Bar charts of chosen figures across ``bench.run_stages`` results: one panel per figure, one bar per run.

    python -m bench.compare_figure --out bench/figures/NAME.png --title "..." \\
        --run "no distortion=bench/results/A.json" --run "0.01=bench/results/B.json" \\
        --figure fscore_1pct --figure chamfer_of_diag --figure offset_median_of_diag_side

Each ``--run`` is ``label=path`` to a results JSON (its ``quality`` block is read); each
``--figure`` a key of that block. A dashed line marks the issue's bound where bench/targets.py
has one for that key (or, for an ``_icp`` figure, for the key it refines).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

from bench.targets import TARGETS, QualityFigure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# The issues' bounds on figures of the quality block, keyed by figure.
BOUNDS = {t.read.key: t.bound for t in TARGETS if isinstance(t.read, QualityFigure)}


def load_runs(specs: list[str]) -> list[tuple[str, dict]]:
    """``label=path`` → (label, quality figures). Raises ValueError naming a malformed spec."""
    runs = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--run {spec!r}: expected label=path/to/results.json")
        runs.append((label, json.loads(Path(path).read_text())["quality"]))
    return runs


def draw(runs: list[tuple[str, dict]], figures: list[str], title: str, out: Path) -> None:
    """One panel per figure; a missing figure in a run is left blank rather than drawn as zero."""
    columns = min(3, len(figures))
    rows = -(-len(figures) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(figures):]:
        ax.set_visible(False)
    labels = [label for label, _ in runs]
    for ax, key in zip(axes.flat, figures):
        values = [quality.get(key) for _, quality in runs]
        shown = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(range(len(runs)), shown, color=["#4c78a8" if v is not None else "none" for v in values])
        for bar, value in zip(bars, values):
            if value is not None:
                ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        mark_bound(ax, key)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize=8)
    save_figure(fig, title, out)


def mark_bound(ax: plt.Axes, key: str) -> None:
    """Title a figure's panel with its key, and mark the issue's bound on it (an ``_icp`` figure
    takes the bound of the figure it refines) as a dashed line where bench/targets.py has one."""
    bound = BOUNDS.get(key.removesuffix("_icp"))
    if bound is not None:
        ax.axhline(bound, color="#e45756", linestyle="--", linewidth=1)
    ax.set_title(key, fontsize=9)


def save_figure(fig: plt.Figure, title: str, out: Path) -> None:
    """Give ``fig`` its title and write it to ``out`` (a PNG), making the folder."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="")
    parser.add_argument("--run", action="append", required=True, help="label=path/to/results.json (repeatable)")
    parser.add_argument("--figure", action="append", required=True, help="a key of the results' quality block (repeatable)")
    args = parser.parse_args()
    draw(load_runs(args.run), args.figure, args.title, args.out)


if __name__ == "__main__":
    main()
