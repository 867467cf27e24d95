#!/usr/bin/env bash
# BENCHMARK USE ONLY: a nerfstudio 1.1.5 command line (ns-train, ns-export tsdf, ns-eval) on a
# machine with no internet whose python3 already has torch (the GPU machine), so that
# `nerf=nerfacto` can run there side by side with our ngp (bench/RESULTS.md, session 15).
# For a worker with internet use infra/nerfstudio/setup_env.sh, the supported path.
#
#   bash bench/nerfstudio_offline/setup_offline_env.sh --download WHEELS   # here, with PyPI
#   bash bench/nerfstudio_offline/setup_offline_env.sh WHEELS ENV_DIR       # there, offline
#
# What differs from nerfstudio's own install, and why:
# - No venv of its own: the wheels go to ENV_DIR/site, ahead of python3's packages on the path, and
#   ENV_DIR/bin gets ns-train / ns-export / ns-eval wrappers. nerfstudio thus runs on the machine's
#   torch (2.11 there), above the < 2.6 that nerfstudio 1.1.5 assumes: its checkpoints load only with
#   TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, which the wrappers set.
# - pymeshlab and open3d are shims (shims/): they do not fit the 64 MB a call may carry. Only
#   `ns-export tsdf --texture-method tsdf` works (nerf.export_method=tsdf nerf.export_texture=false).
# - No tiny-cuda-nn (it builds from GitHub): use nerf.implementation=torch, nerfacto's slower path.
# - LPIPS: nerfstudio's metrics build torchvision's AlexNet with ImageNet weights, which cannot be
#   fetched offline. If $TORCH_HOME has none, a RANDOMLY initialised AlexNet is saved under that
#   name so that ns-train and ns-eval run; their LPIPS is then meaningless (PSNR and SSIM are not
#   affected; training does not use LPIPS). The wrappers point TORCH_HOME at ENV_DIR/torch.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if [ "${1:-}" = "--download" ]; then
    dest="${2:?usage: $0 --download WHEELS_DIR}"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" -r "$here/requirements-py312.txt"
    exit 0
fi

wheels="${1:?usage: $0 WHEELS_DIR ENV_DIR}"
env_dir="${2:?usage: $0 WHEELS_DIR ENV_DIR}"
python="${PYTHON:-python3}"
mkdir -p "$env_dir/bin" "$env_dir/torch/hub/checkpoints"
env_dir="$(cd "$env_dir" && pwd)"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$env_dir/site" "$wheels"/*.whl
cp -r "$here/shims/pymeshlab" "$here/shims/open3d" "$env_dir/site/"

for tool in train:ns-train exporter:ns-export eval:ns-eval; do
    cat > "$env_dir/bin/${tool#*:}" <<WRAPPER
#!/bin/sh
# nerfstudio's ${tool#*:} from $env_dir (bench/nerfstudio_offline/setup_offline_env.sh)
export PYTHONPATH="$env_dir/site" TORCH_HOME="\${TORCH_HOME:-$env_dir/torch}" TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
exec "$python" -c 'import sys; from nerfstudio.scripts.${tool%%:*} import entrypoint; sys.argv[0] = "${tool#*:}"; entrypoint()' "\$@"
WRAPPER
    chmod +x "$env_dir/bin/${tool#*:}"
done

alexnet="$env_dir/torch/hub/checkpoints/alexnet-owt-7be5be79.pth"
if [ ! -f "$alexnet" ]; then
    echo "warning: no AlexNet ImageNet weights offline: saving a RANDOM AlexNet as $alexnet; nerfstudio's LPIPS is meaningless here" >&2
    "$python" -c "import torch, torchvision; torch.manual_seed(0); torch.save(torchvision.models.alexnet().state_dict(), '$alexnet')"
fi

# Importing every method config is where a missing or clashing package shows.
PYTHONPATH="$env_dir/site" "$python" -c "import nerfstudio.configs.method_configs, nerfstudio.scripts.exporter, nerfstudio.scripts.eval"
"$env_dir/bin/ns-train" --help > /dev/null
echo "nerfstudio 1.1.5 (offline, benchmark use): $env_dir"
echo "nerf=nerfacto nerf.env_path=$env_dir/bin nerf.implementation=torch nerf.export_method=tsdf nerf.export_texture=false"
