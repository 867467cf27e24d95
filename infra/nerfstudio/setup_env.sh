#!/usr/bin/env bash
# Creates the separate Python environment that nerf=nerfacto runs nerfstudio's command line from
# (ns-train, ns-export, ns-eval; tasks/nerf/nerfacto.py), and prints the override that points
# KoroKoro at it. nerfstudio 1.1.5 pins versions that clash with KoroKoro's own environment
# (opencv-python-headless==4.10.0.84, protobuf<=3.20.3, gsplat==1.4.0, nerfacc==0.5.2), hence a
# venv of its own. Run it on the GPU worker (or in its image), with internet access:
#
#   bash infra/nerfstudio/setup_env.sh [ENV_DIR]      # default ~/.cache/korokoro/nerfstudio-env
#
# Environment variables:
#   PYTHON        interpreter for the venv (default python3; nerfstudio 1.1.5 + torch 2.1.2: 3.8-3.11)
#   TORCH_VERSION / TORCHVISION_VERSION / TORCH_INDEX
#                 the torch nerfstudio is installed against (default 2.1.2 / 0.16.2 from the cu118
#                 index, nerfstudio's documented pair; CUDA 11.8 wheels run on newer drivers too).
#                 For an H100 with a CUDA 12 toolkit: TORCH_VERSION=2.1.2 TORCH_INDEX=https://download.pytorch.org/whl/cu121
#                 torch must stay below 2.6: nerfstudio 1.1.5 torch.load()s its checkpoints with the
#                 old weights_only=False default; with torch 2.13 ns-train worked but ns-export failed
#                 with "Weights only load failed" (tried on a CPU machine). The script refuses >= 2.6.
#   WITH_TCNN=1   also build tiny-cuda-nn's torch bindings (needs nvcc of the SAME CUDA major as
#                 torch, a C++ compiler and ~10 min). Without it nerfacto falls back to its torch
#                 implementation (nerf.implementation=torch avoids the warning): slower, same outputs.
#                 gsplat 1.4.0 and nerfacc 0.5.2 compile their CUDA kernels on first use (nvcc needed
#                 then; ~1-2 min once, cached under ~/.cache/torch_extensions).
#   DRY_RUN=1     print the commands instead of running them.
set -euo pipefail

ENV_DIR="${1:-${NERFSTUDIO_ENV:-$HOME/.cache/korokoro/nerfstudio-env}}"
PYTHON="${PYTHON:-python3}"
NERFSTUDIO_VERSION="1.1.5"
TORCH_VERSION="${TORCH_VERSION:-2.1.2}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.16.2}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu118}"
WITH_TCNN="${WITH_TCNN:-0}"
DRY_RUN="${DRY_RUN:-0}"

if [ "$(printf '%s\n' 2.6 "$TORCH_VERSION" | sort -V | head -n 1)" = "2.6" ]; then
    echo "error: TORCH_VERSION=$TORCH_VERSION; nerfstudio 1.1.5's ns-export / ns-eval need torch < 2.6 (see the header)" >&2
    exit 2
fi

run() {
    if [ "$DRY_RUN" = "1" ]; then
        echo "+ $*"
    else
        "$@"
    fi
}

if [ "$DRY_RUN" != "1" ]; then
    version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    case "$version" in
        3.8|3.9|3.10|3.11) ;;
        *) echo "warning: $PYTHON is Python $version; torch $TORCH_VERSION has wheels for 3.8-3.11 (set PYTHON=python3.10)" >&2 ;;
    esac
fi

run "$PYTHON" -m venv "$ENV_DIR"
run "$ENV_DIR/bin/python" -m pip install --upgrade pip setuptools wheel
run "$ENV_DIR/bin/python" -m pip install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" --index-url "$TORCH_INDEX"
run "$ENV_DIR/bin/python" -m pip install "nerfstudio==$NERFSTUDIO_VERSION"
if [ "$WITH_TCNN" = "1" ]; then
    run "$ENV_DIR/bin/python" -m pip install ninja
    run "$ENV_DIR/bin/python" -m pip install --no-build-isolation "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"
fi

# nerfacto builds torchmetrics' LPIPS when it sets up, and LPIPS downloads torchvision's AlexNet
# weights on first use: fetch them now, while there is internet. An offline worker needs this file
# in ITS torch hub cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints),
# or ns-train stops with "Name or service not known" before the first step (seen here).
run "$ENV_DIR/bin/python" -c "import torchvision; torchvision.models.alexnet(weights='IMAGENET1K_V1')"

if [ "$DRY_RUN" != "1" ]; then
    for tool in ns-train ns-export ns-eval; do
        if [ ! -x "$ENV_DIR/bin/$tool" ]; then
            echo "error: $ENV_DIR/bin/$tool was not installed; see the pip output above" >&2
            exit 1
        fi
    done
    # Importing every method config is where version clashes show up.
    "$ENV_DIR/bin/ns-train" --help > /dev/null
fi

echo "nerfstudio $NERFSTUDIO_VERSION environment: $ENV_DIR"
echo "Use it with:"
echo "nerf=nerfacto nerf.env_path=$ENV_DIR/bin"
