import time, torch
from tasks.nerf.hashgrid import HashGrid
g = HashGrid(16, 2, 19, 16, 2048).cuda()
p = torch.rand(400_000, 3, device="cuda")
for kind in ("torch", "triton"):
    g.use_kernel(kind)
    for n in (400_000, 400_016, 399_999):
        with torch.no_grad(): g(p[:n] if n <= p.shape[0] else p)
    torch.cuda.synchronize()
    for label, grad in (("no_grad", False), ("fwd+bwd", True)):
        torch.cuda.synchronize(); t0 = time.perf_counter(); cpu = 0.0
        for i in range(50):
            n = 400_000 - 7 * i
            c0 = time.perf_counter()
            with torch.set_grad_enabled(grad):
                out = g(p[:n])
                if grad: (out.sum()).backward()
            cpu += time.perf_counter() - c0
        torch.cuda.synchronize(); wall = time.perf_counter() - t0
        print(f"{kind:6s} {label:8s} per call: wall {wall/50*1e3:.2f} ms, host {cpu/50*1e3:.2f} ms")
# launch overhead with a tiny input
for kind in ("torch", "triton"):
    g.use_kernel(kind); x = p[:1000]
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(200): g(x)
    torch.cuda.synchronize(); print(f"{kind} 1000 points: {(time.perf_counter()-t0)/200*1e6:.0f} us per call")
