"""dllm.kernels: the fused work of a decoding step, each Triton kernel beside its plain-torch twin.

| module       | kernel                                     | used by                         | twin exact? |
|--------------|--------------------------------------------|---------------------------------|-------------|
| rmsnorm.py   | RMSNorm (optionally of a sum), model dtype | torch layers, head              | to rounding |
| rope.py      | RoPE of q and k + cache write of k and v   | torch layers                    | bit for bit |
| attention.py | split-KV attention of <= 128 rows          | torch layers                    | to rounding |
| mlp.py       | silu(gate) * up                            | torch layers                    | to rounding |
| scores.py    | cosine change score + copy of the new rows | executor (DCU, dLLM-Cache)      | to rounding |
| select.py    | DCU row selection (one sequence or a batch); row gather | cache policies, executor | bit for bit |
| residual.py  | delta scatter + residual update of a row range | executor                    | bit for bit |
| vocab.py     | argmax, confidence, APD's c and H per row  | commit policies                 | x0 exact, float64 stats to ~1e-15 |

``KernelPath`` chooses Triton, the twins, or the original unfused path; ``KernelOps`` is the one object
callers use. The ONNX export never sees any of this: exported graphs come from
``dllm.exporter.models`` alone. Each kernel is tested against its twin in tests/kernels (on the CPU
through Triton's interpreter, ``TRITON_INTERPRET=1``).
"""

from dllm.kernels.config import KernelPath, resolve_kernel_path


def make_ops(path: KernelPath | str, device):
    """The KernelOps for a resolved ``path`` on ``device``, or None for the plain path."""
    from dllm.kernels.ops import KernelOps

    path = resolve_kernel_path(path, device)
    return None if path == KernelPath.PLAIN else KernelOps(path, device)


__all__ = ["KernelPath", "make_ops", "resolve_kernel_path"]
