"""Stage records of a benchmark run saved next to its folders, so later runs can start midway.

``records.json`` holds each record's type and fields with paths relative to the run folder:
a run copied elsewhere with what it points to (another machine, a device call) still loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from tasks import types

RECORDS = "records.json"


def save_records(run: Path, records: dict[str, Any]) -> None:
    """Write ``{stage: record}`` to ``run/records.json`` (paths made relative to ``run``)."""
    run = Path(run).resolve()

    def encode(value: Any) -> Any:
        if isinstance(value, Path):
            return {"path": os.path.relpath(value.resolve(), run)}
        return value

    out = {
        name: {"type": type(rec).__name__, "fields": {f.name: encode(getattr(rec, f.name)) for f in dataclasses.fields(rec)}}
        for name, rec in records.items()
    }
    (run / RECORDS).write_text(json.dumps(out, indent=1))


def load_records(run: Path) -> dict[str, Any]:
    """The records :func:`save_records` wrote, their paths resolved against ``run``."""
    run = Path(run).resolve()

    def decode(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"path"}:
            return Path(os.path.normpath(run / value["path"]))
        return value

    raw = json.loads((run / RECORDS).read_text())
    return {
        name: getattr(types, entry["type"])(**{k: decode(v) for k, v in entry["fields"].items()})
        for name, entry in raw.items()
    }


def run_parser(doc: str) -> argparse.ArgumentParser:
    """A tool's command line with what every tool reading a ``bench.run_stages`` folder takes:
    ``--run`` (the folder), ``--turntable`` (its input, with ``truth/``) and ``--profile``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a bench.run_stages output folder (its records.json)")
    parser.add_argument("--turntable", type=Path, required=True, help="folder with truth/ (and frames/)")
    parser.add_argument("--profile", default="gpu")
    return parser
