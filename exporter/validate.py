"""Parity of every exported subgraph: ONNX Runtime (CPU) against the PyTorch module it came from.

Runs on shapes other than the export shapes (several k and N, k = 1, k = N) in two regimes,
reported apart: batch 1 (layers: no padding, the latency case) and batches of 2 and 3 (layers:
mixed sequence lengths, one sequence unpadded and another half padding). Reports each output's worst
max-abs error against its tolerance per regime, and raises one ``ValidationError`` listing every
failing output.

Which check runs depends on the dtype, and the report says which:
- fp32, fp16: ``ort-cpu``: the exported file itself in ONNX Runtime CPU.
- bf16: ONNX Runtime CPU has no bf16 MatMul, so ``ort-cpu-bf16-upcast``: the exported bf16
  file with every bf16 tensor, weight and Cast widened to fp32 (bf16 -> fp32 is exact), run
  in ONNX Runtime CPU against the PyTorch module with the same bf16-rounded weights run in
  fp32. This checks the graph and its weights, not bf16 arithmetic; that runs on a GPU
  (CUDA provider or TensorRT).

Weight-only quantized subgraphs (``dllm-export --quant``, exporter/quant.py) run the same check against
a PyTorch module holding the same dequantized weights, and add their error against the fp32 model to
the report (``quant_error``), which is reported, not judged.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dllm.errors import ValidationError
from dllm.exporter.onnx_export import EXPORT_SIZES
from dllm.exporter.subgraphs import DType, SubgraphDecl


class Check(str, enum.Enum):
    ORT_CPU = "ort-cpu"
    ORT_CPU_BF16_UPCAST = "ort-cpu-bf16-upcast"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """An output passes when max|onnx - torch| <= atol + rtol * max|torch|."""
    atol: float
    rtol: float

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


# fp16: a few ulps of the largest value (the tiny test models have activations in the hundreds).
TOLERANCES = {Check.ORT_CPU: {DType.FP32: Tolerance(1e-5, 1e-4), DType.FP16: Tolerance(1e-3, 2e-2)},
              Check.ORT_CPU_BF16_UPCAST: {DType.BF16: Tolerance(1e-5, 1e-4)}}


class Batching(str, enum.Enum):
    """The regimes every subgraph is validated in, reported apart."""
    SINGLE = "single"        # B = 1; layers get kv_len = N (no padding)
    BATCHED = "batched"      # B > 1; layers get mixed sequence lengths (SubgraphDecl.dummy_inputs)

    @classmethod
    def of(cls, sizes: dict) -> "Batching":
        return cls.SINGLE if sizes["B"] == 1 else cls.BATCHED


def validation_sizes(max_seq_len: int) -> tuple[dict[str, int], ...]:
    """Shapes to validate on: k = 1, k = N, k < N, at B = 1 and at B > 1; none equal to the export shapes."""
    def clip(b, k, n):
        n = min(n, max_seq_len)
        return {"B": b, "k": min(k, n), "N": n}
    sizes = [clip(1, 1, 5), clip(1, 9, 9), clip(1, 17, 64), clip(1, 1, max_seq_len),   # batch 1
             clip(3, 4, 33), clip(2, 9, 9)]                                             # batched, padded
    out = []
    for s in sizes:
        if s not in out and s != EXPORT_SIZES:
            out.append(s)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class OutputResult:
    """The worst case of one output over the validation shapes of one batching regime."""
    subgraph: str
    output: str
    batching: Batching
    max_abs_err: float
    tolerance: float
    sizes: dict                 # the shape at which the error was worst (layers: with each sequence's kv_len)

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_err <= self.tolerance)   # NaN fails

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        dims = ",".join(f"{k}={v}" for k, v in self.sizes.items()).replace(" ", "")
        return (f"{mark} {self.subgraph}.{self.output} [{self.batching.value}]: max abs err {self.max_abs_err:.3g} "
                f"(tolerance {self.tolerance:.3g}) at {dims}")

    def to_dict(self) -> dict:
        return {"max_abs_err": self.max_abs_err, "tolerance": self.tolerance, "sizes": self.sizes}


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    subgraph: str
    dtype: DType
    check: Check
    results: tuple[OutputResult, ...]
    quant_error: dict | None = None      # quantized subgraphs: error against fp32 (exporter/quant.py)

    @property
    def failures(self) -> tuple[OutputResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    @property
    def passed(self) -> bool:
        return not self.failures

    def worst(self) -> dict[str, OutputResult]:
        """Each output's worst result over both regimes (closest to, or furthest beyond, its tolerance)."""
        out: dict[str, OutputResult] = {}
        for r in self.results:
            prev = out.get(r.output)
            if prev is None or _ratio(r.max_abs_err, r.tolerance) > _ratio(prev.max_abs_err, prev.tolerance):
                out[r.output] = r
        return out

    def to_dict(self) -> dict:
        """``outputs``: each output's worst case over every shape; ``batches``: the same per regime."""
        batches: dict[str, dict] = {}
        for r in self.results:
            batches.setdefault(r.batching.value, {})[r.output] = r.to_dict()
        out = {"check": self.check.value, "dtype": self.dtype.value, "passed": self.passed,
               "outputs": {name: r.to_dict() for name, r in self.worst().items()}, "batches": batches}
        if self.quant_error is not None:
            out["quantization_error"] = self.quant_error
        return out

    def format(self) -> str:
        return "\n".join([f"{self.subgraph} [{self.check.value}, {self.dtype.value}]"]
                         + ["  " + r.line() for r in self.results])


def check_for(dtype: DType) -> Check:
    return Check.ORT_CPU_BF16_UPCAST if DType(dtype) == DType.BF16 else Check.ORT_CPU


def validate_subgraph(decl: SubgraphDecl, module: nn.Module, onnx_path: str | Path, dtype: DType | str,
                      max_seq_len: int, threads: int = 1) -> ValidationReport:
    """Run ``onnx_path`` in ONNX Runtime CPU and ``module`` in PyTorch on several shapes; compare every output."""
    import onnxruntime as ort

    from dllm.engines.ort_backend import MATMULNBITS_ACCURACY

    dtype = DType(dtype)
    check = check_for(dtype)
    tol = TOLERANCES[check][dtype]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry(*MATMULNBITS_ACCURACY)
    with tempfile.TemporaryDirectory(prefix="dllm-validate-") as tmp:
        if check == Check.ORT_CPU:
            model_path = str(onnx_path)
        else:
            model_path = str(Path(tmp) / "upcast.onnx")
            _write_upcast(Path(onnx_path), Path(model_path))
            module = copy.deepcopy(module).float()   # same bf16-rounded weights, fp32 arithmetic
        session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
        worst: dict[tuple[str, Batching], tuple[float, float, dict]] = {}
        for i, sizes in enumerate(validation_sizes(max_seq_len)):
            feeds = decl.dummy_inputs(sizes, seed=100 + i)
            if check == Check.ORT_CPU_BF16_UPCAST:
                feeds = {k: v.float() if v.is_floating_point() else v for k, v in feeds.items()}
            with torch.no_grad():
                ref = module(*(feeds[t.name] for t in decl.inputs))
            ref = ref if isinstance(ref, (tuple, list)) else (ref,)
            got = session.run([t.name for t in decl.outputs], {k: v.numpy() for k, v in feeds.items()})
            where = {**sizes, "kv_len": feeds["kv_len"].tolist()} if decl.takes_kv_len else dict(sizes)
            batching = Batching.of(sizes)
            for t, r, g in zip(decl.outputs, ref, got):
                r = r.float().numpy()
                g = g.astype(np.float32)
                err = float(np.abs(g - r).max()) if g.shape == r.shape else float("inf")
                if np.isnan(g).any() or np.isnan(r).any():
                    err = float("nan")
                bound = tol.bound(float(np.abs(r).max()))
                prev = worst.get((t.name, batching))
                if prev is None or _ratio(err, bound) > _ratio(prev[0], prev[1]):
                    worst[(t.name, batching)] = (err, bound, where)
        del session
    results = tuple(OutputResult(decl.name, t.name, b, *worst[(t.name, b)])
                    for b in Batching for t in decl.outputs if (t.name, b) in worst)
    return ValidationReport(decl.name, dtype, check, results)


def _ratio(err: float, bound: float) -> float:
    return float("inf") if np.isnan(err) else err / bound


def raise_for_failures(reports: list[ValidationReport]) -> None:
    """One ValidationError listing every failing output of every subgraph (nothing if all passed)."""
    failures = [r for rep in reports for r in rep.failures]
    if failures:
        checks = sorted({rep.check.value for rep in reports})
        lines = "\n".join("  " + f.line() for f in failures)
        outputs = len({(f.subgraph, f.output) for f in failures})
        raise ValidationError(
            f"{outputs} output(s) of {len({f.subgraph for f in failures})} subgraph(s) disagree with "
            f"PyTorch (check: {', '.join(checks)}):\n{lines}\n"
            "The exported graphs are not trustworthy; report this with the checkpoint's config.json, "
            "or try --dtype fp32 to see whether it is a precision problem.")


# -- bf16 -> fp32 widening of an ONNX graph -------------------------------------------------------

_BF16, _FP32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT


def _widen_tensor(t: onnx.TensorProto) -> None:
    if t.data_type != _BF16:
        return
    if t.HasField("raw_data"):
        bits = np.frombuffer(t.raw_data, dtype=np.uint16)
    else:                       # bf16 in int32_data holds one value per entry
        bits = np.asarray(t.int32_data, dtype=np.uint16)
    values = (bits.astype(np.uint32) << 16).view(np.float32)
    t.ClearField("int32_data")
    t.raw_data = values.tobytes()
    t.data_type = _FP32


def _widen_graph(g: onnx.GraphProto) -> None:
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == _BF16:
            v.type.tensor_type.elem_type = _FP32
    for init in g.initializer:
        _widen_tensor(init)
    for node in g.node:
        for a in node.attribute:
            if node.op_type in ("Cast", "CastLike", "EyeLike", "RandomNormal", "RandomUniform") and \
                    a.name in ("to", "dtype") and a.i == _BF16:
                a.i = _FP32
            if a.type == onnx.AttributeProto.TENSOR:
                _widen_tensor(a.t)
            if a.type == onnx.AttributeProto.GRAPH:
                _widen_graph(a.g)


def _write_upcast(src: Path, dst: Path) -> None:
    model = onnx.load(str(src), load_external_data=True)
    _widen_graph(model.graph)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
