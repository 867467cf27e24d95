#!/usr/bin/env bash
# Create KoroKoro's two work pools and the `gpu` global concurrency limit on the Prefect server
# at $PREFECT_API_URL. Pool and limit names come from conf/config.yaml (deploy.dispatch_pool,
# deploy.gpu_pool, orchestration.gpu_limit or "gpu"); Hydra overrides after GPUS change them.
#
#   infra/pools.sh [process|docker|kubernetes] [GPUS] [hydra overrides...]
#
#   process     (default) plain machines: both pools run flow runs as subprocesses of
#               `prefect worker start`. Start one worker per GPU on the GPU pool, with --limit 1.
#   docker      the GPU pool starts one container per flow run with one GPU reserved
#               (infra/job-templates/docker-gpu.yaml; the worker host needs `pip install
#               prefect-docker` and the NVIDIA container toolkit).
#   kubernetes  the GPU pool starts one Job per flow run requesting nvidia.com/gpu: 1
#               (infra/k8s/gpu-job-template.yaml; the worker needs prefect-kubernetes).
#   GPUS        GPUs you have (default 1): slots of the GPU pool and of the `gpu` limit.
#
# Safe to run again: pools are overwritten, the limit is updated.
set -euo pipefail

kind=${1:-process}
gpus=${2:-1}
shift $(( $# < 2 ? $# : 2 ))
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3
prefect=$(dirname "$python")/prefect
[ -x "$prefect" ] || prefect=prefect
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
case $kind in process|docker|kubernetes) ;; *) echo "usage: $0 [process|docker|kubernetes] [GPUS] [overrides...]" >&2; exit 2 ;; esac
[[ $gpus =~ ^[1-9][0-9]*$ ]] || { echo "GPUS must be a positive integer, got '$gpus'" >&2; exit 2; }

# The names, as the flows will read them.
read -r dispatch_pool gpu_pool gpu_limit < <(cd "$repo" && "$python" - "$@" <<'PY'
import sys
from flows.config import compose_config
cfg = compose_config(sys.argv[1:])
print(cfg["deploy"]["dispatch_pool"], cfg["deploy"]["gpu_pool"], (cfg.get("orchestration") or {}).get("gpu_limit") or "gpu")
PY
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as_json() {  # a YAML base job template → the JSON file `prefect work-pool create` reads
  "$python" -c 'import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)' "$1" > "$2"
}

"$prefect" work-pool create "$dispatch_pool" --type process --overwrite
case $kind in
  process)
    "$prefect" work-pool create "$gpu_pool" --type process --overwrite ;;
  docker)
    as_json "$here/job-templates/docker-gpu.yaml" "$tmp/template.json"
    "$prefect" work-pool create "$gpu_pool" --type docker --base-job-template "$tmp/template.json" --overwrite ;;
  kubernetes)
    as_json "$here/k8s/gpu-job-template.yaml" "$tmp/template.json"
    "$prefect" work-pool create "$gpu_pool" --type kubernetes --base-job-template "$tmp/template.json" --overwrite ;;
esac
# No more runs at once on the GPU pool than there are GPUs.
"$prefect" work-pool set-concurrency-limit "$gpu_pool" "$gpus"

# The global limit GPU stages hold one slot of while they run (conf orchestration.gpu_limit).
if "$prefect" global-concurrency-limit inspect "$gpu_limit" > /dev/null 2>&1; then
  "$prefect" global-concurrency-limit update "$gpu_limit" --limit "$gpus"
else
  "$prefect" global-concurrency-limit create "$gpu_limit" --limit "$gpus"
fi
echo "pools: $dispatch_pool (process), $gpu_pool ($kind, $gpus at a time); global concurrency limit: $gpu_limit = $gpus"
