"""Weight-only quantization of one exported ONNX graph, and reading the quantized weights back.

The form written is the one TensorRT 10 takes for weight-only quantization and ONNX Runtime runs
on the CPU: the weight initializer of each ``MatMul`` becomes integer weights plus scales feeding a
``DequantizeLinear`` whose output is the ``MatMul``'s weight input.

- int8: INT8 weights ``[in, out]``, one scale per output channel (``axis=1``); opset 17 as exported
  (per-axis DequantizeLinear exists since opset 13).
- int4: INT4 weights ``[in, out]``, scales ``[in / block, out]``, ``axis=0`` and ``block_size=block``:
  block-wise DequantizeLinear and the INT4 type need opset 21, so these graphs are converted to 21.
- AWQ adds a ``Mul`` by a per-input-channel constant in front of the ``MatMul`` (the activation side of
  the scale the weights were multiplied by).

The quantization itself is NVIDIA Model Optimizer's (``modelopt.onnx.quantization.int4``, which also
does per-channel int8), run on the CPU with ONNX Runtime's CPU provider for calibration.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import onnx
from onnx import numpy_helper

from dllm.errors import ConfigError, ExportError
from dllm.exporter.quant_config import QuantBits, QuantConfig, QuantMethod

INT4_OPSET = 21
INT4_IR_VERSION = 10              # the IR version that introduced INT4
MODELOPT_METHODS = {QuantMethod.RTN: "rtn_dq", QuantMethod.AWQ: "awq_lite"}
_DQ, _MATMUL, _MUL, _GATHER = "DequantizeLinear", "MatMul", "Mul", "Gather"
# doc_string of the Mul nodes that hold AWQ's input scales (a norm's Mul also multiplies by a constant
# right before a MatMul, so the marker, not the pattern, tells them apart)
AWQ_SCALE_MARK = "dllm: AWQ input scale"
QUANT_INSTALL = "pip install 'dllm-deploy[quant]'"


def modelopt_version() -> str:
    try:
        import modelopt
    except ImportError:
        raise ConfigError(f"--quant needs NVIDIA Model Optimizer, which is not installed; {QUANT_INSTALL}") from None
    return str(modelopt.__version__)


def module_token(node_name: str) -> str:
    """The module an exported node belongs to: ``/q_proj/MatMul`` -> ``q_proj``, ``/embed/Gather`` -> ``embed``."""
    parts = [p for p in node_name.split("/") if p]
    return parts[-2] if len(parts) >= 2 else ""


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def weight_nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    """``MatMul`` nodes whose weight (input 1), or ``Gather`` nodes whose table (input 0), is a 2-D initializer."""
    inits = _initializers(model)
    idx = 1 if op_type == _MATMUL else 0
    return [n for n in model.graph.node if n.op_type == op_type and n.input[idx] in inits
            and len(inits[n.input[idx]].dims) == 2]


def to_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current == opset:
        return model
    try:
        out = version_converter.convert_version(model, opset)
    except Exception as e:  # the converter raises several types
        raise ExportError(f"could not convert the graph from opset {current} to {opset} for int4 "
                          f"({type(e).__name__}: {e}); use --quant int8, which keeps opset {current}") from e
    out.ir_version = max(out.ir_version, INT4_IR_VERSION)
    return out


def _run_modelopt(fn, what: str):
    """Call Model Optimizer with its progress bars and log lines captured (shown only if it fails)."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return fn()
    except Exception as e:  # Model Optimizer raises many types
        tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
        raise ExportError(f"{what}: NVIDIA Model Optimizer failed ({type(e).__name__}: {e})"
                          + (f"; its log ended with:\n{tail}" if tail else "")) from e


def quantize_matmuls(model: onnx.ModelProto, cfg: QuantConfig, feeds: list[dict] | None, what: str
                     ) -> onnx.ModelProto:
    """Every weight ``MatMul`` of ``model`` quantized per ``cfg``; AWQ calibrates on ``feeds`` (ONNX Runtime CPU)."""
    modelopt_version()
    from modelopt.onnx.quantization import int4

    names = [n.name for n in weight_nodes(model, _MATMUL)]
    if not names:
        raise ExportError(f"{what}: no MatMul with a weight initializer to quantize")
    if cfg.method == QuantMethod.AWQ and not feeds:
        raise ConfigError(f"{what}: AWQ needs calibration inputs; pass --calib or use --quant-method rtn")
    kwargs = dict(calibration_method=MODELOPT_METHODS[cfg.method], calibration_data_reader=feeds,
                  calibration_eps=["cpu"], nodes_to_exclude=[], log_level="ERROR",
                  # Model Optimizer's fusion of the AWQ input scales into the preceding node calls a
                  # CuPy-only method (``.get()``) on a NumPy array when CuPy is absent, so on a CPU-only
                  # machine it fails; without fusion every scale stays a Mul in front of its MatMul.
                  awqlite_fuse_nodes=False)
    if cfg.bits == QuantBits.INT8:
        # Model Optimizer's "8-bit layers" are per-channel int8 (block_size -1); naming every weight
        # MatMul gives an all-int8 graph. Names match as exact "/"-separated token sequences.
        kwargs.update(block_size=-1, layers_8bit=",".join(names))
    else:
        model = to_opset(model, INT4_OPSET)
        kwargs.update(block_size=cfg.block_size)
    before = {n.name for n in model.graph.node}
    out = _run_modelopt(lambda: int4.quantize(model, **kwargs), what)
    if cfg.bits == QuantBits.INT4:
        out.ir_version = max(out.ir_version, INT4_IR_VERSION)
    producers = {o: n for n in out.graph.node for o in n.output}
    for mm in weight_matmul_inputs(out):        # Muls Model Optimizer put in front of a MatMul: AWQ scales
        pre = producers.get(mm.input[0])
        if pre is not None and pre.op_type == _MUL and pre.name not in before:
            pre.doc_string = AWQ_SCALE_MARK
    return out


def quantize_gathers(model: onnx.ModelProto, cfg: QuantConfig, what: str) -> onnx.ModelProto:
    """The embedding table of ``model`` quantized: int4 block-wise along D, or int8 per row."""
    nodes = weight_nodes(model, _GATHER)
    if not nodes:
        raise ExportError(f"{what}: no Gather with a table initializer to quantize")
    if cfg.bits == QuantBits.INT4:
        modelopt_version()
        from modelopt.onnx.quantization import int4

        model = to_opset(model, INT4_OPSET)
        out = _run_modelopt(lambda: int4.quantize(model, calibration_method="rtn_dq", log_level="ERROR",
                                                  block_size=cfg.block_size, gather_quantize_axis=1,
                                                  gather_block_size=cfg.block_size), what)
        out.ir_version = max(out.ir_version, INT4_IR_VERSION)
        return out
    # Model Optimizer quantizes Gather tables to int4 only, so int8 rows are quantized here:
    # symmetric round to nearest, one scale per table row (per token), DequantizeLinear axis 0.
    inits = _initializers(model)
    for node in nodes:
        table = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)      # [V, D]
        scale = np.maximum(np.abs(table).max(axis=1), 1e-12) / 127.0                 # [V]
        q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
        dtype = inits[node.input[0]].data_type
        _replace_with_dq(model, node, 0, q, scale.astype(onnx.helper.tensor_dtype_to_np_dtype(dtype)), axis=0)
    return model


def _replace_with_dq(model, node, input_index: int, q: np.ndarray, scale: np.ndarray, axis: int) -> None:
    """Feed ``node.input[input_index]`` from DequantizeLinear(q, scale) instead of its float initializer."""
    old = node.input[input_index]
    base = old.replace(":", "_")
    q_t, s_t = numpy_helper.from_array(q, f"{base}_q"), numpy_helper.from_array(scale, f"{base}_scale")
    dq = onnx.helper.make_node(_DQ, [q_t.name, s_t.name], [f"{base}_dq"], name=f"{base}_DequantizeLinear", axis=axis)
    inits = [t for t in model.graph.initializer if t.name != old]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits + [q_t, s_t])
    node.input[input_index] = dq.output[0]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([dq] + nodes)


def copy_quantized_matmul(src: onnx.ModelProto, dst: onnx.ModelProto, token: str) -> onnx.ModelProto:
    """``dst`` with the weight of its ``token`` MatMul replaced by ``src``'s quantized one (same DQ, same scales).

    Used for the vproj probes: they compute the same ``v_proj`` as their layer, so they take the layer's
    quantized weights verbatim and the value proxy compares like with like.
    """
    s_node = next((n for n in weight_matmul_inputs(src) if module_token(n.name) == token), None)
    d_node = next((n for n in dst.graph.node if n.op_type == _MATMUL and module_token(n.name) == token), None)
    if s_node is None or d_node is None:
        raise ExportError(f"no quantized {token} MatMul to share ({'source' if s_node is None else 'target'} lacks it)")
    src_opset = next(o.version for o in src.opset_import if o.domain in ("", "ai.onnx"))
    dst = to_opset(dst, src_opset)
    d_node = next(n for n in dst.graph.node if n.op_type == _MATMUL and module_token(n.name) == token)
    producers = {o: n for n in src.graph.node for o in n.output}
    s_inits = _initializers(src)
    dq = producers[s_node.input[1]]
    new_nodes, new_inits = [], []
    copied_dq = onnx.NodeProto()
    copied_dq.CopyFrom(dq)
    copied_dq.name, copied_dq.output[0] = f"{token}.shared_dq", f"{token}.shared_dq_out"
    for i, name in enumerate(dq.input):
        t = onnx.TensorProto()
        t.CopyFrom(s_inits[name])
        t.name = copied_dq.input[i] = f"{token}.shared_dq_in{i}"
        new_inits.append(t)
    new_nodes.append(copied_dq)
    old_weight = d_node.input[1]
    d_node.input[1] = copied_dq.output[0]
    pre = _awq_scale_node(producers.get(s_node.input[0]), s_inits)
    if pre is not None:
        const = next(i for i in pre.input if i in s_inits)
        t = onnx.TensorProto()
        t.CopyFrom(s_inits[const])
        t.name = f"{token}.shared_input_scale"
        new_inits.append(t)
        mul = onnx.helper.make_node(_MUL, [d_node.input[0], t.name], [f"{token}.shared_scaled_in"],
                                    name=f"{token}.shared_input_scale_mul", doc_string=AWQ_SCALE_MARK)
        d_node.input[0] = mul.output[0]
        new_nodes.append(mul)
    inits = [t for t in dst.graph.initializer if t.name != old_weight] + new_inits
    del dst.graph.initializer[:]
    dst.graph.initializer.extend(inits)
    nodes = list(dst.graph.node)
    at = nodes.index(d_node)
    del dst.graph.node[:]
    dst.graph.node.extend(nodes[:at] + new_nodes + nodes[at:])
    dst.ir_version = max(dst.ir_version, src.ir_version)
    return dst


def _awq_scale_node(node: onnx.NodeProto | None, inits: dict) -> onnx.NodeProto | None:
    """``node`` if it is a marked AWQ input-scale Mul with a constant scale, else None."""
    if node is None or node.op_type != _MUL or node.doc_string != AWQ_SCALE_MARK:
        return None
    return node if any(i in inits for i in node.input) else None


def weight_matmul_inputs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose weight input comes from a DequantizeLinear (the quantized ones)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return [n for n in model.graph.node if n.op_type == _MATMUL
            and getattr(producers.get(n.input[1]), "op_type", None) == _DQ]


# -- reading the quantized weights back -------------------------------------------------------------
def _array(t: onnx.TensorProto, base_dir: str | None) -> np.ndarray:
    if t.data_location == onnx.TensorProto.EXTERNAL and base_dir is not None:
        t = onnx.TensorProto.FromString(t.SerializeToString())
        onnx.external_data_helper.load_external_data_for_tensor(t, base_dir)
    return numpy_helper.to_array(t).astype(np.float32)


def dequantize(node: onnx.NodeProto, inits: dict, base_dir: str | None = None) -> np.ndarray:
    """What a DequantizeLinear node with constant inputs outputs, in fp32."""
    q = _array(inits[node.input[0]], base_dir)
    scale = _array(inits[node.input[1]], base_dir)
    zero = _array(inits[node.input[2]], base_dir) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.float32)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis = attrs.get("axis", 1) % q.ndim
    block = attrs.get("block_size", 0)
    if block:                                   # block-wise: one scale per block along axis
        scale, zero = (np.repeat(x, block, axis=axis) if x.ndim == q.ndim else x for x in (scale, zero))
    elif scale.ndim == 1 and scale.size > 1:    # per-axis
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero.size > 1 else zero
    return (q - zero) * scale


def dequantized_weights(model: onnx.ModelProto, base_dir: str | None = None) -> dict[str, np.ndarray]:
    """{module token: effective fp32 weight} of every quantized MatMul ([in, out], AWQ input scale folded
    in) and Gather table ([V, D]) of ``model``."""
    inits = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type not in (_MATMUL, _GATHER):
            continue
        w_index = 1 if node.op_type == _MATMUL else 0
        dq = producers.get(node.input[w_index])
        if dq is None or dq.op_type != _DQ:
            continue
        w = dequantize(dq, inits, base_dir)
        pre = _awq_scale_node(producers.get(node.input[0]), inits) if node.op_type == _MATMUL else None
        if pre is not None:
            scale = _array(inits[next(i for i in pre.input if i in inits)], base_dir).reshape(-1)   # [in]
            w = w * scale[:, None]
        out[module_token(node.name)] = w
    return out


def weight_bytes(model: onnx.ModelProto, float_itemsize: int) -> tuple[int, int]:
    """(bytes of every initializer as stored, the same graph's bytes with float weights of ``float_itemsize``).

    Integer weights feeding a DequantizeLinear count ``float_itemsize`` per element in the second figure,
    their scales and the AWQ input scales count nothing there.
    """
    producers_of, awq_scales = {}, set()
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            producers_of.setdefault(name, []).append((n.op_type, i))
        if n.op_type == _MUL and n.doc_string == AWQ_SCALE_MARK:
            awq_scales.update(n.input)
    stored = unquantized = 0
    for t in model.graph.initializer:
        numel = math.prod(t.dims)
        size = _stored_size(t, numel)
        stored += size
        uses = producers_of.get(t.name, [])
        if (_DQ, 0) in uses:
            unquantized += numel * float_itemsize
        elif any(op == _DQ for op, _ in uses) or t.name in awq_scales:
            continue
        else:
            unquantized += size
    return stored, unquantized


def _stored_size(t: onnx.TensorProto, numel: int) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(t.data_type)
    if bits:
        return (numel * bits + 7) // 8
    return numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
