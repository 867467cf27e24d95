"""Hydra configuration for flows that are not started from the ``korokoro`` command line.

Deployments and tests pass Hydra overrides (a JSON-friendly list of strings); this composes
them against ``conf/`` exactly as the command line would and hands back plain containers,
because a DictConfig must not become a Prefect flow parameter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(os.environ.get("KOROKORO_CONF", Path(__file__).resolve().parent.parent / "conf"))


def compose_config(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``conf/config.yaml`` with ``overrides`` applied, resolved to plain dicts and lists."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return to_plain(cfg)


def to_plain(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """A resolved, Hydra-free copy; ``data_dir`` made absolute so workers agree on it."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("hydra", None)
    plain["data_dir"] = str(Path(plain["data_dir"]).expanduser().resolve())
    storage = dict(plain["storage"])
    if "root" in storage:
        storage["root"] = str(Path(storage["root"]).expanduser().resolve())
    plain["storage"] = storage
    return plain


def result_storage(cfg: dict[str, Any]) -> str | Path:
    """Where Prefect persists every stage's result record (``orchestration`` settings).

    ``results_block`` (a storage block slug, e.g. ``s3-bucket/korokoro-results``) wins; else
    ``results_dir`` (a folder, e.g. on a shared mount); else ``<data_dir>/prefect/results``.
    A record is small and points at the stage's folder under ``data_dir/work``: a second
    machine reuses it only when it sees that folder too (``data_dir`` on the same shared path).
    """
    orchestration = cfg.get("orchestration") or {}
    block = orchestration.get("results_block")
    if block:
        return str(block)  # Prefect loads the block by its slug when the task runs
    folder = orchestration.get("results_dir") or Path(cfg["data_dir"]) / "prefect" / "results"
    return Path(folder).expanduser().resolve()  # Prefect makes it a LocalFileSystem
