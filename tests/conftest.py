"""Shared test set-up."""

import os

# Ground-truth turntables render with Mesa's software OpenGL: no display, no GPU.
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")

# Without CUDA, Triton kernels (the fused hash encoding, tasks/nerf/hashgrid_triton.py) run in
# Triton's CPU interpreter, so CI tests them too. Read when triton is first imported (below).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

# Mesa's llvmpipe exports its LLVM symbols process-wide once a test renders; triton (which
# torch imports on the first optimizer step) then crashes while loading its own LLVM. Tests
# render and train in one process, so triton is loaded first. (The pipeline itself renders
# previews in a child process: tasks/mesh_preview.py.)
try:
    import torch._dynamo  # noqa: F401
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

import pytest


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
