"""Shared test set-up."""

import os

# Ground-truth turntables render with Mesa's software OpenGL: no display, no GPU.
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")

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
