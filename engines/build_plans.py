"""Build TensorRT plans for an existing engine directory, on the machine that will run them.

    python -m dllm.engines.build_plans ENGINE_DIR [--optimization-level N]

The Jetson path: ``dllm-export`` runs on a host (it needs the checkpoint, PyTorch's exporter and, for
``--quant``, Model Optimizer); the engine directory is copied to the device; this builds one plan per
subgraph there from the ONNX files alone, with the manifest's optimization profiles, into
``plans/<device tag>/``, and records them in the manifest. Needs only the ``tensorrt`` module
(JetPack ships it) and PyTorch (to name the GPU).

Each plan is written under a temporary name and renamed into place; the manifest is rewritten
atomically last, so an interrupted build leaves the directory loadable as it was. Plans for other
device tags are kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dllm.errors import DllmError, EngineDirError
from dllm.exporter.manifest import MANIFEST, read_manifest

PLANS_DIR = "plans"


def build_plans(engine_dir: str | os.PathLike, optimization_level: int | None = None, log=print) -> str:
    """Build every subgraph's plan for this GPU and TensorRT; returns the device tag they are under."""
    import dataclasses

    from dllm.exporter.config import BuildConfig
    from dllm.exporter.engine_dir import files_sha256, write_json_atomic
    from dllm.engines.trt_build import PlanBuilder, check_dtype_supported, device_tag, gpu_info, load_trt

    root = Path(engine_dir)
    manifest = read_manifest(root)
    trt_mod = load_trt()
    gpu = gpu_info()
    check_dtype_supported(manifest.dtype, gpu[1] if gpu else None)
    tag = device_tag(trt_mod)
    plan_dir = root / PLANS_DIR / tag
    build = BuildConfig(manifest.profiles, timing_cache=plan_dir / "timing.cache",
                        optimization_level=optimization_level)
    for entry in manifest.subgraphs:          # the files are the ones the manifest describes
        onnx_path = root / entry.onnx
        data = onnx_path.with_name(onnx_path.name + ".data")
        if not onnx_path.is_file() or files_sha256([onnx_path] + ([data] if data.exists() else [])) != entry.sha256:
            raise EngineDirError(f"{onnx_path} is missing or differs from its manifest sha256; copy the engine "
                                 "directory again (all of onnx/ and manifest.json)")
    builder = PlanBuilder(build, trt_mod)
    plans = {}
    for i, entry in enumerate(manifest.subgraphs):
        name = entry.decl.name
        t0 = time.perf_counter()
        final = plan_dir / f"{name}.plan"
        partial = plan_dir / f".{name}.plan.partial"
        result = builder.build(entry.decl, root / entry.onnx, partial)
        os.replace(partial, final)
        plans[name] = {"file": f"{PLANS_DIR}/{tag}/{name}.plan", "sha256": files_sha256([final]),
                       "input_hash": entry.sha256, "build_s": round(result.seconds, 3)}
        log(f"[{i + 1}/{len(manifest.subgraphs)}] {name}: {result.size / 2**20:.1f} MiB in "
            f"{time.perf_counter() - t0:.1f} s")
    builder.save_timing_cache()
    info = dict(manifest.build.get("tensorrt") or {})
    info[tag] = {"module": trt_mod.name, "version": trt_mod.version,
                 "timing_cache": f"{PLANS_DIR}/{tag}/timing.cache",
                 "strongly_typed": hasattr(trt_mod.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")}
    updated = dataclasses.replace(manifest, plans={**manifest.plans, tag: plans},
                                  build={**manifest.build, "tensorrt": info},
                                  tools={**manifest.tools, trt_mod.name: trt_mod.version})
    write_json_atomic(root / MANIFEST, updated.to_dict())
    return tag


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dllm.engines.build_plans", description=__doc__.split("\n\n")[0])
    p.add_argument("engine_dir", type=Path, help="engine directory written by dllm-export (copied here)")
    p.add_argument("--optimization-level", type=int, default=None, metavar="N",
                   help="TensorRT builder optimization level 0..5 (default: TensorRT's)")
    args = p.parse_args(argv)
    try:
        tag = build_plans(args.engine_dir, args.optimization_level,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
    except DllmError as e:
        print(f"build_plans: error: {e}", file=sys.stderr)
        return 2
    print(f"plans for {tag} in {args.engine_dir / PLANS_DIR / tag}; run with --backend tensorrt --device cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
