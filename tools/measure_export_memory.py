"""Measure dllm-export's peak memory on a >=1B-parameter LLaDA-layout checkpoint (docs/export-memory.md).

    python -m dllm.tools.measure_export_memory WORK_DIR [--dtype fp16] [--keep]

Writes a random-weight checkpoint (bf16 on disk) tensor by tensor with a streaming safetensors
writer, so neither the writer nor the test ever holds the whole model; exports it in a child
process with ``--no-validate``; reports the child's peak RSS (``ru_maxrss``) against the size of
one layer's weights and of the whole model; deletes the checkpoint and the export unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dllm.spec import Arch, ModelSpec

# ~1.06e9 parameters in LLaDA's layout (MHA, no biases).
MEASURE_SPEC = dict(arch=Arch.LLADA, n_layers=18, d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128,
                    mlp_hidden=5632, vocab_size=32000, max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-5,
                    qkv_bias=False, mask_id=2, eos_ids=(1, 5), logit_shift=False, bos_id=0)

_ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def checkpoint_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face layout with its shape (no weights allocated)."""
    from dllm.exporter.models.checkpoint import _DREAM_LAYER, _LLADA_LAYER
    from dllm.exporter.models.layers import DecoderLayer

    with torch.device("meta"):
        layer = DecoderLayer(spec)
    if spec.arch == Arch.LLADA:
        shapes = {"model.transformer.wte.weight": (spec.vocab_size, spec.d_model)}
        prefix, mapping = "model.transformer.blocks.{i}.", _LLADA_LAYER
        tail = {"model.transformer.ln_f.weight": (spec.d_model,),
                "model.transformer.ff_out.weight": (spec.vocab_size, spec.d_model)}
    else:
        shapes = {"model.embed_tokens.weight": (spec.vocab_size, spec.d_model)}
        prefix, mapping = "model.layers.{i}.", _DREAM_LAYER
        tail = {"model.norm.weight": (spec.d_model,), "lm_head.weight": (spec.vocab_size, spec.d_model)}
    for i in range(spec.n_layers):
        for ours, theirs in mapping.items():
            if ours.endswith(".bias") and not spec.qkv_bias:
                continue
            shapes[prefix.format(i=i) + theirs] = tuple(layer.get_parameter(ours).shape)
    shapes.update(tail)
    return shapes


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]], make, dtype: torch.dtype) -> int:
    """Write a safetensors file one tensor at a time: header first, then ``make(name, shape)`` per tensor.

    Peak memory is one tensor. Returns the bytes written.
    """
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = item * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                      # safetensors aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes.items():
            t = make(name, shape).to(dtype).contiguous()
            f.write(t.view(-1).view(torch.uint8).numpy().tobytes())
            del t
    return 8 + len(raw) + offset


def write_random_checkpoint(path: Path, spec: ModelSpec, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random-weight checkpoint directory (config, one safetensors file, tokenizer), written streaming."""
    from dllm.exporter.models.writer import build_tokenizer, hf_config

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def make(name, shape):
        if name.endswith("norm.weight") or name.endswith("ln_f.weight") or "layernorm" in name:
            return torch.ones(shape)
        return torch.randn(shape, generator=g) * shape[-1] ** -0.5

    (path / "config.json").write_text(json.dumps(hf_config(spec, dtype), indent=2))
    write_safetensors_streaming(path / "model.safetensors", checkpoint_shapes(spec), make, dtype)
    build_tokenizer(spec.arch).save_pretrained(str(path))
    return path


def _hwm_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# The child samples /proc/self/status every 20 ms: VmHWM is the kernel's peak RSS of this process
# (reset by exec, unlike ru_maxrss which keeps the parent's peak); RssAnon/RssFile split it into
# heap (what bounds memory) and mapped file pages (reclaimable page cache).
CHILD = """
import json, sys, threading, time, torch
torch.set_num_threads(1)
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k] = int(v.split()[0])
    return d
peak = {"RssAnon": 0, "RssFile": 0}
per_subgraph = {}
stop = False
def sample():
    while not stop:
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(0.02)
from dllm.exporter.config import ExportConfig
from dllm.exporter.export import Status, export_checkpoint
base = status()
def progress(event):
    if event.status == Status.DONE:
        per_subgraph[event.name] = status()["VmHWM"]
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
export_checkpoint(ExportConfig(sys.argv[1], sys.argv[2], dtype=sys.argv[3], validate=False, with_vproj=False,
                               max_seq_len=2048), progress=progress)
seconds = time.perf_counter() - t
stop = True
print(json.dumps({"baseline_kb": base["VmRSS"], "peak_kb": status()["VmHWM"], "peak_anon_kb": peak["RssAnon"],
                  "peak_file_kb": peak["RssFile"], "hwm_after_kb": per_subgraph, "seconds": seconds}))
"""


def measure(work: Path, dtype: str = "fp16", keep: bool = False) -> dict:
    spec = ModelSpec(**MEASURE_SPEC)
    need = spec.n_params() * 2 * 2.2          # bf16 checkpoint + fp16 export + slack
    free = shutil.disk_usage(work if work.exists() else work.parent).free
    if free < need:
        raise SystemExit(f"need about {need / 1e9:.1f} GB free in {work}, have {free / 1e9:.1f} GB")
    ckpt, out = work / "ckpt-1b", work / "engines-1b"
    t = time.perf_counter()
    write_random_checkpoint(ckpt, spec)
    write_s = time.perf_counter() - t
    writer_peak_kb = _hwm_kb()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(out), dtype],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"export failed:\n{proc.stderr[-4000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        onnx_bytes = sum(p.stat().st_size for p in (out / "onnx").iterdir())
    finally:
        if not keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    item = 2 if dtype in ("fp16", "bf16") else 4
    D, F, V = spec.d_model, spec.mlp_hidden, spec.vocab_size
    layer_params = 4 * D * spec.n_heads * spec.head_dim + 3 * D * F + 2 * D
    return {
        "params": spec.n_params(), "export_dtype": dtype, "checkpoint_GB_bf16": spec.n_params() * 2 / 1e9,
        "write_seconds": round(write_s, 1), "writer_peak_rss_GB": writer_peak_kb / 1e6,
        "export_seconds": round(child["seconds"], 1),
        "baseline_rss_GB": child["baseline_kb"] / 1e6, "peak_rss_GB": child["peak_kb"] / 1e6,
        "peak_anon_GB": child["peak_anon_kb"] / 1e6, "peak_file_GB": child["peak_file_kb"] / 1e6,
        "peak_rss_after_GB": {k: v / 1e6 for k, v in child["hwm_after_kb"].items()},
        "layer_weights_GB": layer_params * item / 1e9, "largest_subgraph_GB": V * D * item / 1e9,
        "model_weights_GB": spec.n_params() * item / 1e9, "onnx_GB": onnx_bytes / 1e9,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path, help="scratch directory (needs ~5 GB)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32", "bf16"])
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    r = measure(args.work, args.dtype, args.keep)
    print(json.dumps(r, indent=2))
    print(f"peak RSS {r['peak_rss_GB']:.2f} GB = {r['peak_rss_GB'] / r['layer_weights_GB']:.1f}x one layer "
          f"({r['layer_weights_GB']:.3f} GB), {r['peak_rss_GB'] / r['model_weights_GB']:.2f}x the model "
          f"({r['model_weights_GB']:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
