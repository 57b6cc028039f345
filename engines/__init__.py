"""dllm.engines: one Engine interface, three backends, and loading an engine directory.

>>> from dllm.engines import open_engine_dir
>>> engines = open_engine_dir("out/", backend="onnxruntime", device="cpu")
>>> engines.layer(0).run({"h_rows": h, "pos": pos, "kv_len": kv_len, "k_cache": kc, "v_cache": vc})

Only light modules are imported here; ONNX Runtime and TensorRT load when a backend is asked for.
"""

from dllm.engines.base import Backend, Engine
from dllm.engines.engine_set import EngineSet, torch_engine_set
from dllm.engines.loader import BackendStatus, available_backends, open_engine_dir

__all__ = ["Backend", "BackendStatus", "Engine", "EngineSet", "available_backends", "open_engine_dir",
           "torch_engine_set"]
