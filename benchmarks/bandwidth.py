"""Memory read bandwidth (one thread) and one decoding-sized product: what bounds single-stream sampling.

    python benchmarks/bandwidth.py
"""

import time

import torch

torch.set_num_threads(1)
a = torch.randn(64_000_000 // 4 * 4)  # 256 MB
for _ in range(2): a.sum()
ts=[]
for _ in range(5):
    t=time.perf_counter(); a.sum(); ts.append(time.perf_counter()-t)
ts.sort(); print(f"read bandwidth, 1 thread: {a.numel()*4/ts[2]/1e9:.1f} GB/s (sum over 256 MB, median of 5)")
w = torch.randn(2048, 512); x = torch.randn(1, 512)
for _ in range(50): x @ w.t()
t=time.perf_counter()
for _ in range(2000): x @ w.t()
dt=(time.perf_counter()-t)/2000
print(f"1x512 @ 512x2048 fp32 (4 MB of weights): {dt*1e6:.0f} us = {4.19e6/dt/1e9:.1f} GB/s of weights")
