"""The ``korokoro`` command: a subcommand followed by Hydra overrides.

    korokoro run video=path/to/mug.mp4 name="red mug" profile=cpu nerf.steps=500
    korokoro --multirun run video=mug.mp4 name=mug nerf.steps=500,1000
    korokoro add video=mug.mp4 name="red mug"      # queue it only
    korokoro queue                                  # process the queue until it is empty
    korokoro list                                   # the products table
    korokoro view                                   # the shop-page viewer on http://127.0.0.1:8765
    korokoro fetch unique_id=mug-1 out=mug/          # a DONE product's model from the store, every part verified
    korokoro deploy profile=gpu                     # the deployments on $PREFECT_API_URL's server (infra/README.md)
    korokoro serve profile=cpu                      # or serve them here: process-queue every deploy.interval_s
    korokoro weights                                # what detector=/segmenter= choices need, and what is present
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

CONF_DIR = Path(os.environ.get("KOROKORO_CONF", Path(__file__).resolve().parent.parent / "conf"))


class UsageError(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"korokoro: {message}\n\n{__doc__}")


def _prepare_prefect(cfg: dict[str, Any]) -> None:
    """Keep Prefect's results under data_dir, before Prefect is imported."""
    data = Path(cfg["data_dir"])
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(data / "prefect" / "results"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if os.environ.get("PREFECT_API_URL") == "":
        # An empty API URL breaks Prefect's ephemeral mode (shared/NOTES.md).
        del os.environ["PREFECT_API_URL"]


def _enqueue(cfg: dict[str, Any]):
    from tasks.fingerprint import hash_file
    from tasks.storage import open_store

    if not cfg.get("video"):
        raise UsageError("give the product's video: video=path/to/video.mp4")
    video = Path(cfg["video"]).expanduser()
    if not video.is_file():
        raise UsageError(f"video {video} does not exist")
    title = cfg.get("name") or video.stem
    uid = cfg.get("unique_id") or hash_file(video)[:16]
    store = open_store(cfg["storage"])
    product = store.enqueue(str(title), str(cfg.get("category") or "others"), video, str(uid))
    print(f"queued {product.unique_id} ({product.title!r}) from {video}")
    return product


def cmd_run(cfg: dict[str, Any], on_result: Callable[[Any], None] | None = None) -> int:
    from flows.reconstruct import reconstruct_and_report

    product = _enqueue(cfg)
    result = reconstruct_and_report(product.unique_id, config=cfg)
    if on_result is not None:
        on_result(result)  # a multirun job: its row of the sweep's comparison table
    print()
    print(f"product {result.unique_id}: {result.status}" + (f" — {result.error}" if result.error else ""))
    if result.status == "DONE":
        print(f"  GLB:      {result.glb}")
        print(f"  OBJ:      {result.obj}")
        print(f"  shards:   {result.shards_dir}")
        print(f"  manifest: {result.manifest_key} (in {cfg['storage']['root']})")
    print(f"  report:   {result.report}")
    return 0 if result.status == "DONE" else 1


def cmd_add(cfg: dict[str, Any]) -> int:
    _enqueue(cfg)
    return 0


def cmd_queue(cfg: dict[str, Any]) -> int:
    from flows.process_queue import process_queue

    results = process_queue(config=cfg)
    done = sum(r.status == "DONE" for r in results)
    print(f"processed {len(results)} products: {done} DONE, {len(results) - done} FAILED")
    return 0


def cmd_list(cfg: dict[str, Any]) -> int:
    from tasks.storage import open_store

    products = open_store(cfg["storage"]).list_products()
    print(f"{'unique_id':18} {'status':10} {'tries':>5}  title / error")
    for p in products:
        print(f"{p.unique_id:18} {p.status:10} {p.attempts:>5}  {p.title}" + (f" — {p.error}" if p.error else ""))
    return 0


def cmd_view(cfg: dict[str, Any]) -> int:
    from flows.viewer_server import serve

    storage = cfg["storage"]
    if storage["backend"] != "local":
        raise UsageError("korokoro view serves the local store; a Supabase store is read by the viewer directly")
    viewer = cfg.get("viewer", {})
    serve(Path(storage["root"]), storage["bucket"], viewer.get("host", "127.0.0.1"), int(viewer.get("port", 8765)))
    return 0


def cmd_weights(cfg: dict[str, Any]) -> int:
    from tasks.isolation_weights import weights_report

    print(weights_report(cfg))
    return 0


def _given_overrides() -> list[str]:
    """The Hydra overrides on this command line: deployments hand them to every run."""
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task]


def _need_server(command: str) -> None:
    # Prefect's temporary (ephemeral) server runs no scheduler: schedules would never fire.
    if not os.environ.get("PREFECT_API_URL"):
        raise UsageError(
            f"{command} needs a Prefect server: run `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )


def cmd_deploy(cfg: dict[str, Any]) -> int:
    from flows.deploy import deploy_to_server

    _need_server("deploy")
    for name, deployment_id in deploy_to_server(cfg, _given_overrides()).items():
        print(f"deployed {name} ({deployment_id})")
    return 0


def cmd_serve(cfg: dict[str, Any]) -> int:
    from flows.deploy import serve_here

    _need_server("serve")
    serve_here(cfg, _given_overrides())
    return 0


def cmd_fetch(cfg: dict[str, Any]) -> int:
    from tasks.fetch import fetch_model
    from tasks.shard import ManifestError
    from tasks.storage import StoreError, open_store

    if not cfg.get("unique_id"):
        raise UsageError("give the product: unique_id=<id> (see korokoro list), and optionally out=<dir>")
    uid = str(cfg["unique_id"])
    out = Path(cfg.get("out") or Path(cfg["data_dir"]) / "fetched" / uid).expanduser()
    try:
        got = fetch_model(open_store(cfg["storage"]), uid, out, int(cfg["storage"].get("fetch_workers", 4)))
    except (StoreError, ManifestError) as exc:
        print(f"korokoro fetch: {exc}", file=sys.stderr)
        return 1
    print(f"fetched {uid} from {got.manifest_key}, every part's sha256 verified:")
    for path in got.files:
        print(f"  {path} ({path.stat().st_size} bytes)")
    return 0


HANDLERS: dict[str, Callable[[dict[str, Any]], int]] = {
    "run": cmd_run,
    "add": cmd_add,
    "queue": cmd_queue,
    "list": cmd_list,
    "view": cmd_view,
    "fetch": cmd_fetch,
    "deploy": cmd_deploy,
    "serve": cmd_serve,
    "weights": cmd_weights,
}
COMMANDS = tuple(HANDLERS)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args if a in COMMANDS), None)
    if command is None:
        raise UsageError("missing command: one of " + ", ".join(COMMANDS))
    args.remove(command)

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from flows.config import to_plain
    from flows.multirun import SweepTable

    codes: list[int] = []
    sweep: dict[str, Any] = {"table": SweepTable(), "dir": None}

    def job(cfg: DictConfig) -> None:
        plain = to_plain(cfg)
        _prepare_prefect(plain)
        hydra_cfg = HydraConfig.get()
        if command == "run" and hydra_cfg.mode == RunMode.MULTIRUN:
            sweep["dir"] = hydra_cfg.sweep.dir
            number, overrides = int(hydra_cfg.job.num), list(hydra_cfg.overrides.task)
            codes.append(cmd_run(plain, on_result=lambda r: sweep["table"].add(number, overrides, r)))
        else:
            codes.append(HANDLERS[command](plain))

    sys.argv = [sys.argv[0], *args]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(job)()
    if sweep["table"].rows:
        markdown, table_csv = sweep["table"].write(Path(sweep["dir"]))
        print(f"\ncomparison of {len(sweep['table'].rows)} jobs: {markdown} (and {table_csv.name})")
    sys.exit(max(codes, default=0))


if __name__ == "__main__":
    main()
