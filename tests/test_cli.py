"""The korokoro command: subcommands, Hydra overrides, multirun, clear usage errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flows import cli
from tasks.storage import open_store
from tests import bad_inputs


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KOROKORO_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(sys, "argv", ["korokoro"])
    return tmp_path / "data"


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        cli.main(args)
    return done.value.code


def test_add_then_list_with_multirun(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    video = bad_inputs.write_video(tmp_path / "mug.mp4", bad_inputs.textured_frames(12, 64, 48))
    assert _run(["add", f"video={video}", "name=red mug", "unique_id=mug-1"]) == 0
    assert "queued mug-1 ('red mug')" in capsys.readouterr().out
    assert _run(["--multirun", "list", "queue.lease_s=10,20"]) == 0
    out = capsys.readouterr().out
    assert out.count("mug-1") == 2 and out.count("IDLE") == 2  # one job per swept value
    product = open_store({"backend": "local", "root": str(data_dir / "store")}).get("mug-1")
    assert product.title == "red mug" and product.status == "IDLE"


def test_missing_command_prints_usage(data_dir: Path) -> None:
    with pytest.raises(SystemExit, match="missing command: one of run, add, queue, list, view"):
        cli.main(["video=x.mp4"])


def test_run_needs_an_existing_video(data_dir: Path) -> None:
    with pytest.raises(SystemExit, match="video /nowhere/mug.mp4 does not exist"):
        cli.main(["run", "video=/nowhere/mug.mp4"])
    with pytest.raises(SystemExit, match="give the product's video"):
        cli.main(["add"])
