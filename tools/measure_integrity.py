"""Measure what the integrity checks cost when loading a ~1B-parameter engine directory (docs/reliability.md).

    python -m dllm.tools.measure_integrity WORK_DIR [--dtype fp16] [--keep]

Writes the random-weight 1B LLaDA-layout checkpoint of ``measure_export_memory``, exports it with
``--no-validate --no-vproj``, then times, each as the median of three runs:

- the manifest read and its consistency check;
- the default check with a valid verified stamp (sizes and file identities: one stat per file);
- the default check without a stamp, i.e. the first load of a copied directory (every file hashed,
  then the stamp written), and ``--verify`` (every file hashed), with the page cache warm and cold
  (``posix_fadvise(DONTNEED)`` evicts the files' pages first);
- the torch backend's checkpoint fingerprint and full weight digest;
- opening the directory on ONNX Runtime, for scale.

and extrapolates each to a 16 GB directory (an 8B model in bf16: 134 files). Deletes everything
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from dllm.spec import ModelSpec

GB = 1e9
TARGET_BYTES = 16e9
TARGET_FILES = 2 * (1 + 32 + 1 + 32) + 2          # LLaDA-8B: embed, 32 layers, head, 32 vproj (+ data), tokenizer


def evict(root: Path) -> None:
    """Drop the files' pages from the page cache (clean pages; no privileges needed)."""
    os.sync()
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn, repeat: int = 3, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(work: Path, dtype: str = "fp16", keep: bool = False) -> dict:
    from dllm.engines import open_engine_dir
    from dllm.exporter.config import ExportConfig
    from dllm.exporter.export import export_checkpoint
    from dllm.exporter.identity import checkpoint_fingerprint, checkpoint_sha256
    from dllm.exporter.integrity import STAMP, check_consistency, onnx_checks, verify_files
    from dllm.exporter.manifest import read_manifest
    from dllm.tools.measure_export_memory import MEASURE_SPEC, write_random_checkpoint

    spec = ModelSpec(**MEASURE_SPEC)
    ckpt, out = work / "ckpt-1b", work / "engines-1b"
    try:
        write_random_checkpoint(ckpt, spec)
        t = time.perf_counter()
        export_checkpoint(ExportConfig(ckpt, out, dtype=dtype, validate=False, with_vproj=False, max_seq_len=2048))
        export_s = time.perf_counter() - t
        m = read_manifest(out)
        checks = onnx_checks(m)
        files = sum(len(c.paths) for c in checks)
        size = sum((out / p).stat().st_size for c in checks for p in c.paths)

        def unstamped():
            (out / STAMP).unlink(missing_ok=True)
            return verify_files(out, checks)

        r = {
            "params": spec.n_params(), "dtype": dtype, "files": files, "bytes": size, "export_s": export_s,
            "manifest_s": timed(lambda: check_consistency(out, read_manifest(out))),
            "stamped_s": timed(lambda: verify_files(out, checks)),
            "first_load_warm_s": timed(unstamped),
            "first_load_cold_s": timed(unstamped, before=lambda: evict(out)),
            "verify_warm_s": timed(lambda: verify_files(out, checks, full=True)),
            "verify_cold_s": timed(lambda: verify_files(out, checks, full=True), before=lambda: evict(out)),
            "fingerprint_s": timed(lambda: checkpoint_fingerprint(ckpt)),
            "weights_sha256_s": timed(lambda: checkpoint_sha256(ckpt), repeat=1),
            "checkpoint_bytes": (ckpt / "model.safetensors").stat().st_size,
            "open_ort_s": timed(lambda: open_engine_dir(out, "onnxruntime", intra_op_threads=1), repeat=1),
            "cores": os.cpu_count(), "load_avg": os.getloadavg(),
        }
        assert verify_files(out, checks).hashed_files == 0                    # the stamp is back
    finally:
        if not keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    per_byte = {k: r[k] / r["bytes"] for k in ("first_load_warm_s", "first_load_cold_s", "verify_warm_s",
                                                "verify_cold_s")}
    r["at_16GB"] = {"stamped_s": r["stamped_s"] / r["files"] * TARGET_FILES,
                    **{k: v * TARGET_BYTES for k, v in per_byte.items()},
                    "weights_sha256_s": r["weights_sha256_s"] / r["checkpoint_bytes"] * TARGET_BYTES}
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path, help="scratch directory (needs ~5 GB)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32", "bf16"])
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(measure(args.work, args.dtype, args.keep), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
