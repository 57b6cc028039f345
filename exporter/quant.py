"""``Quantizer``: weight-only int8/int4 quantization of an export's subgraphs, and how far each lands from fp32.

Used by ``export_checkpoint`` subgraph by subgraph, in export order (embed, layers, head, vproj probes):

1. ``quantize(decl, path)`` rewrites the exported ONNX file in place (``quant_graph``): the layers'
   seven weight matrices always, the head and embedding only when asked, and each vproj probe takes
   its layer's quantized ``v_proj`` verbatim. AWQ calibrates a subgraph on the real inputs it sees:
   the fp32 model's hidden states of the calibration canvases, carried forward layer by layer (one
   layer in memory at a time, like the export).
2. ``validate(decl, module, path, max_seq_len)`` checks two things and reports both:
   - the graph: ONNX Runtime on the quantized file against the PyTorch module holding the very same
     dequantized weights, at the export's usual tolerances (a wrong graph fails the export);
   - the quantization: ONNX Runtime on the quantized file against the fp32 PyTorch module, as the
     relative RMS and max abs error of every output on held-out calibration canvases (random inputs for
     the vproj probes and the embedding). This is reported, not judged: see ``dllm-eval`` for accuracy.
3. ``record(root, names)`` is what the manifest's ``quantization`` key holds.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dllm.errors import ConfigError
from dllm.exporter.calibration import CalibrationSet, is_shipped_model, load_calibration
from dllm.exporter.quant_config import TASKS_SOURCE, QuantBits, QuantConfig, QuantMethod
from dllm.exporter.subgraphs import DType, Kind, SubgraphDecl, build_module, layer_name


class Quantizer:
    """Quantizes the subgraphs of one export and measures their error against the fp32 model."""

    def __init__(self, cfg: QuantConfig, ckpt, dtype: DType | str, max_seq_len: int):
        from dllm.exporter.quant_graph import modelopt_version

        self.cfg, self.ckpt, self.dtype = cfg, ckpt, DType(dtype)
        self.tool = f"nvidia-modelopt {modelopt_version()}"
        spec = ckpt.spec
        cfg.check_dims({"d_model": spec.d_model, "n_heads * head_dim": spec.n_heads * spec.head_dim,
                        "mlp_hidden": spec.mlp_hidden})
        source = cfg.calib or (TASKS_SOURCE if is_shipped_model(ckpt.path) else None)
        if source is None and cfg.method == QuantMethod.AWQ:
            raise ConfigError("AWQ calibrates on prompts and this checkpoint has no default set: pass --calib "
                              "FILE (a text file, one sample per line, or a JSONL file), or --quant-method rtn")
        self.calibration: CalibrationSet | None = None
        if source is not None:
            self.calibration = load_calibration(source, ckpt.tokenizer(), spec, max_seq_len, cfg.calib_samples)
        self._hidden: torch.Tensor | None = None     # fp32 inputs of layer self._at, every canvas [n, N, D]
        self._at = -1

    # -- what gets quantized ------------------------------------------------------------------------
    def applies(self, decl: SubgraphDecl) -> bool:
        return decl.kind in (Kind.LAYER, Kind.VPROJ) or (decl.kind == Kind.HEAD and self.cfg.head) or \
            (decl.kind == Kind.EMBED and self.cfg.embed)

    def fingerprint(self, decl: SubgraphDecl) -> dict | None:
        """What a quantized subgraph depends on beyond its weights (for the export's input hash)."""
        if not self.applies(decl):
            return None
        calib = self.calibration.sha256 if self.calibration and self.cfg.method == QuantMethod.AWQ else None
        return {**self.cfg.to_dict(), "calibration": calib, "tool": self.tool}

    # -- calibration inputs -----------------------------------------------------------------------
    def _inputs_of(self, layer: int) -> torch.Tensor:
        """fp32 hidden states entering ``layer`` (``n_layers``: entering the final norm) [n, N, D]."""
        cal = self.calibration
        with torch.no_grad():
            if self._hidden is None or layer < self._at:
                ids = torch.tensor(cal.calib + (() if cal.holdout_is_calib else cal.holdout))    # [n, N]
                self._hidden, self._at = self.ckpt.load_embed(torch.float32)(ids), 0
            while self._at < layer:
                self._hidden = self.ckpt.load_layer(self._at, torch.float32)(self._hidden)
                self._at += 1
        return self._hidden

    def _feeds(self, decl: SubgraphDecl, held_out: bool) -> list[dict[str, torch.Tensor]] | None:
        """Real inputs of a layer or the head: one feed per canvas (calibration or held-out ones)."""
        cal = self.calibration
        if cal is None or decl.kind not in (Kind.LAYER, Kind.HEAD):
            return None
        h = self._inputs_of(decl.layer if decl.kind == Kind.LAYER else self.ckpt.spec.n_layers)
        n = len(cal.calib)
        rows = h[:n] if not held_out else (h[:n] if cal.holdout_is_calib else h[n:])
        out = []
        for x in rows.split(1):                                                      # [1, N, D]
            feed = {"h_rows": x}
            if decl.kind == Kind.LAYER:
                N, spec = x.shape[1], self.ckpt.spec
                feed["pos"] = torch.arange(N, dtype=torch.int32)[None]
                if decl.takes_kv_len:
                    feed["kv_len"] = torch.full((1,), N, dtype=torch.int32)   # one canvas per feed: no padding
                feed["k_cache"] = feed["v_cache"] = torch.zeros(1, N, spec.n_kv_heads, spec.head_dim)
            out.append(feed)
        return out

    def _as_numpy(self, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: (v.to(self.dtype.torch) if v.is_floating_point() else v).numpy() for k, v in feed.items()}

    # -- 1. quantize ---------------------------------------------------------------------------------
    def quantize(self, decl: SubgraphDecl, path: Path) -> None:
        """Rewrite the subgraph's ONNX file (and its .data) in place with quantized weights."""
        from dllm.exporter import quant_graph as qg
        from dllm.exporter.onnx_export import _move_weights_to_data_file, check_onnx_io, data_path

        if not self.applies(decl):
            return
        path = Path(path)
        model = onnx.load(str(path), load_external_data=True)
        if decl.kind == Kind.VPROJ:
            layer = onnx.load(str(path.with_name(f"{layer_name(decl.layer)}.onnx")), load_external_data=True)
            model = qg.copy_quantized_matmul(layer, model, "v_proj")
        elif decl.kind == Kind.EMBED:
            model = qg.quantize_gathers(model, self.cfg, decl.name)
        else:
            feeds = self._feeds(decl, held_out=False) if self.cfg.method == QuantMethod.AWQ else None
            model = qg.quantize_matmuls(model, self.cfg, [self._as_numpy(f) for f in feeds or []], decl.name)
        data = data_path(path)
        for p in (path, data):
            p.unlink(missing_ok=True)
        _move_weights_to_data_file(model, data)
        onnx.save_model(model, str(path))
        check_onnx_io(path, decl)

    # -- 2. validate ---------------------------------------------------------------------------------
    def validate(self, decl: SubgraphDecl, module: nn.Module, path: Path, max_seq_len: int):
        """The graph check (same dequantized weights, usual tolerances) plus the error against fp32."""
        from dllm.exporter.validate import validate_subgraph

        if not self.applies(decl):
            return validate_subgraph(decl, module, path, self.dtype, max_seq_len)
        same_weights = load_quantized_weights(copy.deepcopy(module), path)
        report = validate_subgraph(decl, same_weights, path, self.dtype, max_seq_len)
        return dataclasses.replace(report, quant_error=self.error(decl, path, max_seq_len))

    def error(self, decl: SubgraphDecl, path: Path, max_seq_len: int) -> dict:
        """Per output: relative RMS and max abs error of the quantized file (ONNX Runtime) against fp32 PyTorch."""
        import onnxruntime as ort

        from dllm.engines.ort_backend import MATMULNBITS_ACCURACY

        feeds = self._feeds(decl, held_out=True)
        inputs = "held-out calibration canvases" if feeds else "random inputs"
        if self.calibration is not None and self.calibration.holdout_is_calib and feeds:
            inputs = "the calibration canvases (the source has too few samples to hold any out)"
        if not feeds:
            n = min(64, max_seq_len)
            feeds = [decl.dummy_inputs({"B": 1, "k": n, "N": n}, seed=200 + i) for i in range(2)]
            feeds = [{k: v.float() if v.is_floating_point() else v for k, v in f.items()} for f in feeds]
        reference = build_module(decl, self.ckpt, DType.FP32)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 1, 3
        opts.add_session_config_entry(*MATMULNBITS_ACCURACY)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [t.name for t in decl.outputs]
        diff2, ref2, worst = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for feed in feeds:
            with torch.no_grad():
                ref = reference(*(feed[t.name] for t in decl.inputs))
            ref = ref if isinstance(ref, (tuple, list)) else (ref,)
            got = session.run(names, self._as_numpy(feed))
            for name, r, g in zip(names, ref, got):
                r, g = r.double().numpy(), g.astype(np.float64)
                diff2[name] += float(((g - r) ** 2).sum())
                ref2[name] += float((r ** 2).sum())
                worst[name] = max(worst[name], float(np.abs(g - r).max()))
        return {"against": "fp32", "inputs": inputs, "outputs": {
            n: {"rel_rms": (diff2[n] / ref2[n]) ** 0.5 if ref2[n] > 0 else 0.0, "max_abs_err": worst[n]}
            for n in names}}

    # -- 3. the manifest record ------------------------------------------------------------------
    def record(self, root: Path, subgraphs: list[tuple[SubgraphDecl, str]]) -> dict:
        """The manifest's ``quantization`` object (docs/engine-dir.md)."""
        from dllm.exporter.quant_graph import INT4_OPSET, MODELOPT_METHODS, weight_bytes

        itemsize = torch.empty(0, dtype=self.dtype.torch).element_size()
        sizes: dict[str, dict] = {}
        for decl, rel in subgraphs:
            stored, unquantized = weight_bytes(onnx.load(str(Path(root) / rel), load_external_data=False), itemsize)
            s = sizes.setdefault(decl.kind.value, {"bytes": 0, "unquantized_bytes": 0})
            s["bytes"] += stored
            s["unquantized_bytes"] += unquantized
        for s in sizes.values():
            s["ratio"] = round(s["bytes"] / s["unquantized_bytes"], 4) if s["unquantized_bytes"] else None
        cal = self.calibration
        return {
            **self.cfg.to_dict(),
            "scheme": ("symmetric, one scale per output channel" if self.cfg.bits == QuantBits.INT8 else
                       f"symmetric, one scale per {self.cfg.block_size} input channels of each output channel"),
            "opset": INT4_OPSET if self.cfg.bits == QuantBits.INT4 else None,
            "tool": f"{self.tool} (modelopt.onnx.quantization.int4, {MODELOPT_METHODS[self.cfg.method]})",
            "subgraphs": [decl.name for decl, _ in subgraphs if self.applies(decl)],
            "calibration": {**cal.to_dict(), "used_for": (["awq", "error"] if self.cfg.method == QuantMethod.AWQ
                                                          else ["error"])} if cal else None,
            "weight_bytes": sizes,
        }


def load_quantized_weights(module: nn.Module, onnx_path: Path) -> nn.Module:
    """``module`` (a subgraph's PyTorch module) with every weight its ONNX file quantizes replaced by the
    dequantized one (AWQ input scales folded in), so it computes what the quantized graph computes."""
    from dllm.exporter.quant_graph import dequantized_weights

    onnx_path = Path(onnx_path)
    weights = dequantized_weights(onnx.load(str(onnx_path), load_external_data=False), str(onnx_path.parent))
    by_token = {name.rsplit(".", 1)[-1]: m for name, m in module.named_modules()
                if isinstance(m, (nn.Linear, nn.Embedding))}
    with torch.no_grad():
        for token, w in weights.items():
            target = by_token.get(token)
            if target is None:
                raise ConfigError(f"{onnx_path.name}: quantized weight of {token!r} has no module to go to")
            value = torch.from_numpy(w.T.copy() if isinstance(target, nn.Linear) else w)
            target.weight.copy_(value.to(target.weight.dtype))
    return module


def quant_summary(quantization: dict | None, validation: dict) -> list[str]:
    """Lines for ``dllm-export``'s summary: what was quantized, bytes against unquantized, error against fp32."""
    if not quantization:
        return []
    q = quantization
    block = f", block {q['block_size']}" if q.get("block_size") else ""
    sizes = ", ".join(f"{kind} {s['ratio']:.3f}x" for kind, s in q["weight_bytes"].items() if s.get("ratio"))
    lines = [f"  quantization: {q['format']} {q['method']}{block}, {len(q['subgraphs'])} subgraphs; "
             f"weight bytes vs unquantized: {sizes}"]
    errors = [(o["rel_rms"], name, out) for name, v in validation.items() if v.get("quantization_error")
              for out, o in v["quantization_error"]["outputs"].items()]
    if errors:
        errors.sort()
        median = errors[len(errors) // 2][0]
        worst = errors[-1]
        lines.append(f"  quantization error vs fp32 (relative RMS per output): median {median:.2%}, "
                     f"worst {worst[1]}.{worst[2]} {worst[0]:.2%}")
    return lines
