"""A training step as one CUDA graph: rays, marching, both passes, the losses, backward and Adam,
replayed with a single launch.

Why: on an H100 a step of the eager loop is paced by the host launching its ~540 kernels, not
by the GPU (300 steps of the box: 6.8 s of host time against 2.0 s of GPU time; session 10), so
the training time followed the CPU of whichever host was lent. A graph replays every kernel
without the host. It needs fixed shapes and no step that waits for the GPU, so the samples go
into batches of fixed size (:meth:`GridSampler.sample_fixed`, ``torch.nonzero_static``), padded
with samples of width zero on extra rays that weigh nothing. The sizes come from the counts of
the eager steps before capture, with a margin; a running peak of the counts is read at each
occupancy refresh (that refresh waits for the GPU anyway) and, if a batch overflowed or is
mostly padding, the step is captured again with sizes that fit.

The step draws its own rays from the capture's tensors with a registered generator, and reads
the occupancy grid's tensors, which its refreshes change in place. Training on the CPU keeps
eager steps; the tests run the fixed batches there without a graph, against the packed path.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tasks.nerf.field import GridSampler, NgpModel
from tasks.nerf.packed import PackedSamples, composite_packed, visible_samples

# Rays that share a fixed batch's padding (see tasks.nerf.packed.padding_ray_indices).
PADDING_RAYS = 1024

# Capacities are rounded up to a multiple of this, so the kernels' sizes stay aligned (Triton
# specialises on divisibility by 16) whatever the counts.
_QUANTUM = 1024


@dataclass(frozen=True)
class SampleCapacity:
    """Fixed sizes of a captured step's sample batches: ``marched`` samples in occupied cells,
    ``visible`` of them in front of the early stop (what the colour pass and backward see)."""

    marched: int
    visible: int

    @classmethod
    def covering(cls, marched: int, visible: int, margin: float) -> "SampleCapacity":
        """Room for ``margin`` times the given counts, rounded up to a multiple of 1024."""
        def room(count: int) -> int:
            return max(1, math.ceil(count * margin / _QUANTUM)) * _QUANTUM
        return cls(room(marched), room(visible))

    def holds(self, marched: int, visible: int) -> bool:
        return marched <= self.marched and visible <= self.visible


def render_fixed(
    model: NgpModel,
    sampler: GridSampler,
    origins: Tensor,
    directions: Tensor,
    capacity: SampleCapacity,
    early_stop_eps: float,
    generator: torch.Generator | None = None,
    jitter: bool = True,
) -> tuple[dict[str, Tensor], PackedSamples, Tensor]:
    """:func:`tasks.nerf.field.render_rays` in batches of fixed size.

    origins, unit directions ``[R, 3]`` → ``rgb [R, 3]``, ``alpha [R]``, ``depth [R]``,
    ``weights [C]``; the ``C = capacity.visible`` samples (``capacity.marched`` without early
    stop) of ``R + PADDING_RAYS`` rays, the last ones holding padding; and the counts ``[2]``
    int64 of marched and visible samples, which exceed the capacity when samples were dropped.
    """
    n_rays = origins.shape[0]
    samples, marched = sampler.sample_fixed(origins.detach(), directions.detach(), capacity.marched, PADDING_RAYS,
                                            jitter, generator)
    # The padding rays reuse the first ray's origin and direction: their samples have no width.
    origins = torch.cat([origins, origins[:1].expand(PADDING_RAYS, 3)])
    directions = torch.cat([directions, directions[:1].expand(PADDING_RAYS, 3)])
    visible = marched
    if early_stop_eps > 0:
        with torch.no_grad():
            sigma = model.geometry(samples.points(origins, directions))[0]
            keep = visible_samples(sigma, samples, early_stop_eps) & (samples.t_ends > samples.t_starts)
            index = torch.nonzero_static(keep, size=capacity.visible, fill_value=keep.shape[0])[:, 0]
            visible = keep.sum()
        samples = samples.take(index, PADDING_RAYS)
    sigma, rgb = model(samples.points(origins, directions), samples.per_sample(directions))
    out = composite_packed(sigma, rgb, samples)
    out = {key: value if key == "weights" else value[:n_rays] for key, value in out.items()}
    return out, samples, torch.stack([marched, visible])


StepLosses = Callable[[SampleCapacity], tuple[Tensor, Tensor, Tensor]]


class CapturedStep:
    """One training step captured as a CUDA graph and replayed.

    ``losses(capacity)`` draws a batch and returns (loss to minimise, colour loss, counts ``[2]``
    of :func:`render_fixed`). Each call of this object is exactly one optimiser step: the first
    ``warmup`` calls after a new capacity run eagerly on a side stream (lazy initialisation must
    not happen during capture), the next one captures and replays. ``optimizer`` must be
    capturable, with tensor learning rates (set them in place between calls). :meth:`check`
    resizes the batches to the counts: grown after an overflow, shrunk once the capacity is
    over ``1 / shrink_below`` times what the counts need.
    """

    def __init__(
        self, losses: StepLosses, optimizer: torch.optim.Optimizer, capacity: SampleCapacity, margin: float,
        generator: torch.Generator, warmup: int = 2, shrink_below: float = 0.6,
    ) -> None:
        self.losses = losses
        self.optimizer = optimizer
        self.capacity = capacity
        self.margin = margin
        self.generator = generator
        self.warmup = warmup
        self.shrink_below = shrink_below
        self.device = generator.device
        self.peak = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._eager_left = warmup
        self._loss = self._color_loss = torch.zeros((), device=self.device)
        self.captures = 0
        self.overflows = 0
        # (step, marched, visible): the capacities the step was captured with, and when they were set.
        self.history: list[tuple[int, int, int]] = []

    def _step(self) -> tuple[Tensor, Tensor]:
        loss, color_loss, counts = self.losses(self.capacity)
        loss.backward()
        self.optimizer.step()
        torch.maximum(self.peak, counts, out=self.peak)
        return loss.detach(), color_loss.detach()

    def __call__(self) -> tuple[Tensor, Tensor]:
        """One training step → (loss, colour loss), 0-d tensors on the device (overwritten by the next step)."""
        if self.graph is None and self._eager_left > 0:
            self._eager_left -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                self._loss, self._color_loss = self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return self._loss, self._color_loss
        if self.graph is None:
            self._capture()
        assert self.graph is not None
        self.graph.replay()
        return self._loss, self._color_loss

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        register = getattr(graph, "register_generator_state", None)
        if register is not None:  # needed up to PyTorch 2.11; later versions register lazily (and deprecate it)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                register(self.generator)
        # Gradients set to None now are allocated inside the graph's memory and rewritten, not
        # accumulated, on every replay.
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self._loss, self._color_loss = self._step()
        self.graph = graph
        self.captures += 1

    def _recapture(self) -> None:
        """Drop the graph (its memory pool goes once nothing refers to it): the next calls warm up
        and capture the step again."""
        self.graph = None
        self._eager_left = self.warmup

    def retarget(self, losses: StepLosses) -> None:
        """Step with ``losses`` from now on (captured again on a following call; same capacity,
        which the next :meth:`check` fits to the new counts)."""
        self.losses = losses
        self._recapture()

    def check(self, step: int) -> bool:
        """Whether the batches since the last check fitted their capacity snugly (waits for the
        GPU once). If one overflowed, or the counts fell so far that most of each batch is
        padding (the occupancy grid keeps shrinking as the field sharpens), the capacity becomes
        the peak count times the margin and the next calls capture the step again."""
        marched, visible = self.peak.tolist()
        self.peak.zero_()
        fitted = SampleCapacity.covering(marched, visible, self.margin)
        overflowed = not self.capacity.holds(marched, visible)
        # Shrink only well below the capacity: a capture costs the warm-up steps and a little memory churn.
        oversized = (fitted.marched < self.shrink_below * self.capacity.marched
                     or fitted.visible < self.shrink_below * self.capacity.visible)
        if not (overflowed or oversized):
            return True
        self.overflows += overflowed
        self.capacity = fitted
        self.history.append((step, fitted.marched, fitted.visible))
        self._recapture()
        return False
