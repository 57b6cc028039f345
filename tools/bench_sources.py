"""What ``dllm-bench`` measures: an engine set (engine directory or random weights) and its prompts.

- ``open_engines``: an exported engine directory on a backend, or, with ``--random-weights``, a model
  shape with random weights (``dllm.tools.random_model``) as torch engines or as ONNX Runtime engines
  exported to a temporary directory.
- ``make_prompts``: task prompts (``dllm.tools.tasks``) when the engine set has a tokenizer, else seeded
  random token ids.

For large shapes on ONNX Runtime, exporting 32 layers of random weights would take long and write tens
of GB, so one layer (and one value probe) is exported and its ONNX file serves every layer: the
engines run the real per-layer graphs and read a full layer's weights from device memory per call,
but all layers hold the same values. The returned notes say when that path was taken.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import tempfile
from pathlib import Path

import torch

from dllm.engines.engine_set import EngineSet
from dllm.errors import ConfigError
from dllm.exporter.subgraphs import DType, declare, layer_name, vproj_name
from dllm.spec import ModelSpec

# Above this many bytes of layer weights, ONNX Runtime random-weight runs export one shared layer.
SHARE_LAYER_BYTES = 1 << 30


class PromptKind(str, enum.Enum):
    TASK = "task"        # generated task problems through the chat template (exact match is checkable)
    RANDOM = "random"    # seeded random token ids


@dataclasses.dataclass(frozen=True)
class Prompts:
    """The prompts every method decodes, with what is needed to score their answers."""
    kind: PromptKind
    ids: tuple[tuple[int, ...], ...]
    problems: tuple = ()         # dllm.tools.tasks.Problem per prompt (TASK only)
    note: str = ""

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.ids]


@dataclasses.dataclass
class EngineSource:
    """An opened engine set plus how it came to be (for the JSON report)."""
    engines: EngineSet
    description: dict
    max_seq_len: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    tempdir: tempfile.TemporaryDirectory | None = None     # kept alive while the engines run

    def close(self) -> None:
        if self.tempdir is not None:
            self.tempdir.cleanup()
            self.tempdir = None


def ort_options(threads: int | None) -> dict:
    return {} if threads is None else {"intra_op_threads": threads}


def open_engine_dir_source(path: str, backend: str, device: str, threads: int | None,
                           cuda_graphs: bool, kernels: str = "auto", verify: bool = False) -> EngineSource:
    """An exported engine directory on ``backend``/``device`` (``verify``: hash every file first)."""
    from dllm.engines.loader import open_engine_dir
    from dllm.exporter.manifest import read_manifest

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory; pass an engine directory written by dllm-export "
                          "(or use --random-weights SHAPE)")
    manifest = read_manifest(root)
    options = {"cuda_graphs": True} if backend == "torch" and cuda_graphs else {}
    engines = open_engine_dir(root, backend, device, threads=threads, kernels=kernels, verify_hashes=verify,
                              **options)
    desc = {"engine_dir": str(root.absolute()), "dtype": manifest.dtype, "model": manifest.model.to_dict(),
            "checkpoint": manifest.source.get("checkpoint"), "random_weights": False}
    return EngineSource(engines, desc, max_seq_len=manifest.max_seq_len)


def weight_bytes_per_step(spec: ModelSpec, dtype: DType) -> int:
    """Bytes of weights a full forward reads: every layer, the final norm and the LM head.

    The embedding is a gather of N rows, not a full read, so it is left out.
    """
    D, H, Hkv, hd, F = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.mlp_hidden
    layer = D * H * hd + 2 * D * Hkv * hd + H * hd * D + 3 * D * F + 2 * D
    if spec.qkv_bias:
        layer += H * hd + 2 * Hkv * hd
    elems = spec.n_layers * layer + D + D * spec.vocab_size
    return elems * dtype.torch.itemsize


def open_random_source(shape: str, layers: int | None, dtype: str, backend: str, device: str,
                       threads: int | None, cuda_graphs: bool, with_vproj: bool,
                       share_layers: bool | None = None, seed: int = 0, kernels: str = "auto") -> EngineSource:
    """Random weights of a named shape or SPEC.json on ``backend``/``device``.

    share_layers: ONNX Runtime only; export one layer and reuse its file for every layer
        (None: only when the layers hold more than SHARE_LAYER_BYTES).
    """
    from dllm.tools.random_model import random_model, random_spec

    overrides = {} if layers is None else {"n_layers": layers}
    spec = random_spec(shape, **overrides)
    dt = DType(dtype)
    desc = {"random_weights": shape, "dtype": dt.value, "model": spec.to_dict(), "seed": seed,
            "weight_bytes_per_step": weight_bytes_per_step(spec, dt)}
    if backend == "torch":
        from dllm.engines.engine_set import torch_engine_set

        model = random_model(spec, dt.torch, device, seed=seed)
        engines = torch_engine_set(model, dt, device, with_vproj=with_vproj, cuda_graphs=cuda_graphs,
                                   threads=threads, kernels=kernels)
        return EngineSource(engines, desc)
    if backend != "onnxruntime":
        raise ConfigError(f"--random-weights runs on --backend torch or onnxruntime, got {backend!r}; TensorRT "
                          "needs plans built by dllm-export from a checkpoint")
    if share_layers is None:
        share_layers = weight_bytes_per_step(spec, dt) > SHARE_LAYER_BYTES and spec.n_layers > 1
    tmp = tempfile.TemporaryDirectory(prefix="dllm-bench-")
    try:
        engines, notes = _export_random_ort(spec, dt, Path(tmp.name), device, threads, with_vproj,
                                            share_layers, seed, kernels)
    except BaseException:
        tmp.cleanup()
        raise
    desc["onnx_layers"] = "shared: layer 0's ONNX file serves every layer" if share_layers else "one per layer"
    return EngineSource(engines, desc, notes=notes, tempdir=tmp)


def _export_random_ort(spec: ModelSpec, dt: DType, root: Path, device: str, threads: int | None,
                       with_vproj: bool, share_layers: bool, seed: int, kernels: str = "auto"
                       ) -> tuple[EngineSet, list[str]]:
    """Export the random model's subgraphs (on the CPU) to ``root`` and open them in ONNX Runtime."""
    from dllm.engines.base import Backend
    from dllm.engines.ort_backend import OrtEngine, OrtOptions
    from dllm.exporter.onnx_export import export_subgraph
    from dllm.tools.random_model import random_model

    notes = []
    export_spec = dataclasses.replace(spec, n_layers=1) if share_layers else spec
    model = random_model(export_spec, dt.torch, "cpu", seed=seed)
    files = {}
    for decl in declare(export_spec, dt, with_vproj=with_vproj):
        out, module = export_subgraph(decl, model, dt, root / f"{decl.name}.onnx")
        files[decl.name] = out.model
        del module
    del model
    if share_layers:
        # the external-data path inside the file is relative, so a link in the same folder reads layer 0's data
        for i in range(1, spec.n_layers):
            for name, first in ((layer_name(i), layer_name(0)), (vproj_name(i), vproj_name(0))):
                if first in files:
                    link = root / f"{name}.onnx"
                    link.symlink_to(files[first].name)
                    files[name] = link
        notes.append(f"ONNX Runtime random weights: layer 0 exported once and its ONNX file loaded for all "
                     f"{spec.n_layers} layers (same values in every layer; timings are unaffected)")
    from dllm.kernels import make_ops

    opts = OrtOptions(**ort_options(threads))
    dev = torch.device(device)
    engines = {decl.name: OrtEngine(decl, files[decl.name], dev, opts)
               for decl in declare(spec, dt, with_vproj=with_vproj)}
    return EngineSet(spec, dt, Backend.ONNXRUNTIME, dev, engines, threads=opts.intra_op_threads,
                     ops=make_ops(kernels, dev)), notes


# -- prompts --------------------------------------------------------------------------------------
def make_prompts(engines: EngineSet, tokenizer, n: int, prompt_len: int | None, seed: int,
                 tasks: tuple[str, ...] = ("arithmetic", "sorting")) -> Prompts:
    """``n`` prompts: task problems through the chat template when a tokenizer is given and the task
    generators import, else seeded random ids of ``prompt_len`` (default 64) tokens.

    Task prompts keep their natural length unless ``prompt_len`` is given; then they are cut to their
    last ``prompt_len`` tokens or left-padded with the pad (EOS) token, which the model never saw in
    training: expect lower accuracy for every method alike.
    """
    if n < 1:
        raise ConfigError(f"--num-prompts must be at least 1, got {n}")
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        return _random_prompts(engines.spec, n, prompt_len or 64, seed,
                               "random token ids (the tokenizer has no chat template for task prompts)")
    if tokenizer is not None:
        try:
            from dllm.tools import tasks as task_mod
        except ImportError:
            task_mod = None
        if task_mod is not None:
            return _task_prompts(task_mod, tokenizer, engines.spec, n, prompt_len, seed, tasks)
    return _random_prompts(engines.spec, n, prompt_len or 64, seed,
                           "random token ids (no tokenizer)" if tokenizer is None else "random token ids")


def _task_prompts(task_mod, tokenizer, spec: ModelSpec, n: int, prompt_len: int | None, seed: int,
                  tasks: tuple[str, ...]) -> Prompts:
    per = [task_mod.generate(t, -(-n // len(tasks)), seed=seed, split="test") for t in tasks]
    problems = [per[i % len(tasks)][i // len(tasks)] for i in range(n)]     # interleaved tasks
    ids = []
    for p in problems:
        out = tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        ids.append([int(x) for x in out])
    note = f"task prompts ({', '.join(tasks)}, test split, seed {seed}) at their natural length"
    if prompt_len is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else spec.eos_ids[0]
        ids = [p[-prompt_len:] if len(p) >= prompt_len else [pad] * (prompt_len - len(p)) + p for p in ids]
        note = (f"task prompts ({', '.join(tasks)}, test split, seed {seed}) left-padded with id {pad} or "
                f"cut to their last {prompt_len} tokens")
    return Prompts(PromptKind.TASK, tuple(tuple(p) for p in ids), tuple(problems), note)


def _random_prompts(spec: ModelSpec, n: int, length: int, seed: int, note: str) -> Prompts:
    rng = random.Random(seed)
    banned = {spec.mask_id, *spec.eos_ids}
    ids = []
    for _ in range(n):
        row = []
        while len(row) < length:
            t = rng.randrange(spec.vocab_size)
            if t not in banned:
                row.append(t)
        ids.append(tuple(row))
    return Prompts(PromptKind.RANDOM, tuple(ids), (), f"{note}: {n} x {length}, seed {seed}")
