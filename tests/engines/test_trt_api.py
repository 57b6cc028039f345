"""The TensorRT code path uses only API that TensorRT 10.3 (JetPack 6) has.

Every attribute name used in engines/trt_backend.py, trt_build.py and build_plans.py (``x.name`` and the names
given to ``hasattr``/``getattr``) must be either TensorRT 10.3 Python API from the list below, or a name
known not to be TensorRT's (Python, torch, this package). A new TensorRT call therefore fails this test
until it is added to the list, which is the moment to check that TensorRT 10.3 has it.

The list was checked against the pybind11 module of ``tensorrt-cu12-bindings==10.3.0`` (every name is
present in its ``tensorrt.so``; ``__version__`` is set by its ``__init__.py``).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = ("engines/trt_backend.py", "engines/trt_build.py", "engines/build_plans.py")

TENSORRT_10_3 = frozenset({
    # module level
    "__version__", "Logger", "WARNING", "Builder", "Runtime", "OnnxParser", "DataType", "FLOAT", "HALF", "BF16",
    "INT32", "INT64", "TensorIOMode", "INPUT", "BuilderFlag", "FP16", "NetworkDefinitionCreationFlag",
    "STRONGLY_TYPED", "ExecutionContextAllocationStrategy", "USER_MANAGED",
    # Builder, IBuilderConfig, IOptimizationProfile, ITimingCache, OnnxParser
    "create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network",
    "set_flag", "builder_optimization_level", "add_optimization_profile", "set_shape", "create_timing_cache",
    "set_timing_cache", "serialize", "parse_from_file", "num_errors", "get_error",
    # Runtime, ICudaEngine, IExecutionContext
    "deserialize_cuda_engine", "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
    "num_optimization_profiles", "create_execution_context", "get_device_memory_size_for_profile_v2",
    "device_memory_size", "set_optimization_profile_async", "set_device_memory", "device_memory",
    "set_input_shape", "set_tensor_address", "execute_async_v3",
})

NOT_TENSORRT = frozenset({
    # Python and the standard library
    "__init__", "__name__", "append", "catch_warnings", "dataclass", "exists", "get", "items", "join", "lower",
    "mkdir", "parent", "PathLike", "perf_counter", "read_bytes", "replace", "simplefilter", "st_size", "stat",
    "strip", "sub", "update", "value", "write", "write_bytes", "ArgumentParser", "add_argument", "exit",
    "is_file", "parse_args", "split", "stderr", "with_name",
    # torch
    "Tensor", "cuda", "cuda_stream", "current_device", "current_stream", "data_ptr", "device", "empty",
    "get_device_capability", "get_device_name", "index", "is_available", "numel", "shape", "type", "uint8",
    # this package (declarations, profiles, configs, the engine base class, our own attributes)
    "FP32", "_cache", "_cache_config", "_check_io", "_choice", "_context", "_contexts", "_logger", "_network",
    "_profile_for", "_runtime", "_scratch", "_scratch_size", "allocate_outputs", "buffer", "build_config",
    "builder", "contiguous_inputs", "decl", "dim_sizes", "dtype", "engine", "inputs", "is_rtx", "logger", "max",
    "min", "mod", "name", "opt", "optimization_level", "outputs", "plan_path", "profiles", "timing_cache", "trt",
    "version", "build", "engine_dir", "onnx", "plans", "save_timing_cache", "seconds", "sha256", "size",
    "subgraphs", "to_dict", "tools",
})


def used_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            names.add(node.args[1].value)
    return names


@pytest.mark.parametrize("rel", FILES)
def test_tensorrt_code_uses_only_tensorrt_10_3_api(rel):
    unknown = used_names(ROOT / rel) - TENSORRT_10_3 - NOT_TENSORRT
    assert not unknown, (f"{rel} uses {sorted(unknown)}, in neither list of {Path(__file__).name}: if it is "
                         "TensorRT API, check that TensorRT 10.3 (JetPack 6) has it before adding it")


def test_the_lists_do_not_overlap_and_are_all_used():
    assert not TENSORRT_10_3 & NOT_TENSORRT
    used = set().union(*(used_names(ROOT / rel) for rel in FILES))
    assert not (TENSORRT_10_3 | NOT_TENSORRT) - used, "drop names the TensorRT code no longer uses"


def test_a_newer_api_is_caught(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("def f(engine):\n    return engine.get_aliased_input_tensor('x')   # TensorRT 10.4+\n")
    assert used_names(newer) - TENSORRT_10_3 - NOT_TENSORRT == {"get_aliased_input_tensor"}
