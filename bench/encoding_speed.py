"""The hash encoding alone, plain PyTorch against the fused Triton kernels (CUDA).

    python -m bench.encoding_speed [--points 400000] [--calls 50]

Per call, mean of ``--calls``: wall time (synchronised) and host time, without and with the
backward; then the launch overhead on 1000 points. The grid is the GPU profile's
(16 levels, 2 features, 2^19 rows, 16 to 2048 cells).
"""

from __future__ import annotations

import argparse
import time

import torch

from tasks.nerf.hashgrid import HashGrid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=400_000)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.encoding_speed needs a CUDA GPU (the fused kernels run only there)")
    grid = HashGrid(16, 2, 19, 16, 2048).cuda()
    points = torch.rand(args.points, 3, device="cuda")
    for kind in ("torch", "triton"):
        grid.use_kernel(kind)
        with torch.no_grad():  # compile and warm up, at a few sizes (Triton specialises on them)
            for n in (args.points, args.points - 1, args.points - 16):
                grid(points[:n])
        for label, backward in (("no_grad", False), ("fwd+bwd", True)):
            torch.cuda.synchronize()
            started, host = time.perf_counter(), 0.0
            for i in range(args.calls):
                part = points[: args.points - 7 * i]
                call = time.perf_counter()
                with torch.set_grad_enabled(backward):
                    out = grid(part)
                    if backward:
                        out.sum().backward()
                host += time.perf_counter() - call
            torch.cuda.synchronize()
            wall = time.perf_counter() - started
            print(f"{kind:6s} {label:8s} per call: wall {wall / args.calls * 1e3:.2f} ms, host {host / args.calls * 1e3:.2f} ms")
    small = points[:1000]
    for kind in ("torch", "triton"):
        grid.use_kernel(kind)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(200):
                grid(small)
        torch.cuda.synchronize()
        print(f"{kind} 1000 points: {(time.perf_counter() - started) / 200 * 1e6:.0f} us per call")


if __name__ == "__main__":
    main()
