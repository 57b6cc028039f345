"""Time torch's attention backends and our split-KV Triton kernel at a decoding step's shapes (GPU).

    python3 scripts/sdpa-backends.py [--heads 32] [--head-dim 128] [--canvas 1280] [--rows 33,65,256,1280]

Queries [1, H, k, hd] attend over the canvas caches [1, N, H, hd] viewed as [1, H, N, hd] (strided, as the
layers pass them). Prints microseconds per call (median of CUDA-event timings) per backend and row count;
``split-kv`` is ``dllm.kernels.attention`` (what ``--attention split-kv`` runs for rows <= 128), and the last
column its largest difference from torch's default backend.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dllm.kernels.attention import MAX_ROWS, attention_triton

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def time_us(fn, reps=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--canvas", type=int, default=1280)
    p.add_argument("--rows", default="33,65,256,1280")
    args = p.parse_args()
    H, hd, N = args.heads, args.head_dim, args.canvas
    g = torch.Generator(device="cuda").manual_seed(0)
    cache_k = torch.randn(1, N, H, hd, device="cuda", dtype=torch.bfloat16, generator=g)
    cache_v = torch.randn(1, N, H, hd, device="cuda", dtype=torch.bfloat16, generator=g)
    print(f"attention over {N} keys, {H} heads x {hd}, bf16 (us per call, median)")
    print("rows  " + "  ".join(f"{name:>9}" for name in [*BACKENDS, "split-kv", "max|diff|"]))
    kv_len = torch.full((1,), N, dtype=torch.int32, device="cuda")
    for k in (int(x) for x in args.rows.split(",")):
        q = torch.randn(1, k, H, hd, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        row = []
        for backend in BACKENDS.values():
            try:
                with sdpa_kernel(backend):
                    us = time_us(lambda: F.scaled_dot_product_attention(q, cache_k.transpose(1, 2),
                                                                        cache_v.transpose(1, 2)))
                row.append(f"{us:9.1f}")
            except RuntimeError:
                row.append(f"{'n/a':>9}")
        if k <= MAX_ROWS:
            q_rows = q.transpose(1, 2).contiguous()                   # [1, k, H, hd], as the layers hold it
            row.append(f"{time_us(lambda: attention_triton(q_rows, cache_k, cache_v, kv_len)):9.1f}")
            want = F.scaled_dot_product_attention(q, cache_k.transpose(1, 2), cache_v.transpose(1, 2))
            got = attention_triton(q_rows, cache_k, cache_v, kv_len).view(1, k, H, hd).transpose(1, 2)
            row.append(f"{(got.float() - want.float()).abs().max().item():9.2e}")   # against the default backend
        print(f"{k:4d}  " + "  ".join(row))


if __name__ == "__main__":
    main()
