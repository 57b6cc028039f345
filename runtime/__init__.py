"""dllm.runtime: one decode loop over engines, with cache and commit policies.

>>> from dllm.runtime import Pipeline, DecodeConfig, method_config
>>> pipe = Pipeline.from_dir("out/", backend="onnxruntime")
>>> pipe.generate("Hello", method_config("dcu+apd", DecodeConfig(gen_length=64))).text

``decode(engines, prompt_ids, cfg)`` is the ids-only loop under the Pipeline.
"""

from dllm.runtime.config import (Alg, Allocation, ApdMode, CachePolicyKind, CommitPolicyKind, DecodeConfig, Proxy,
                                 Remasking)
from dllm.runtime.loop import DecodeResult, decode
from dllm.runtime.methods import method_config
from dllm.runtime.pipeline import GenerationResult, Pipeline

__all__ = ["Alg", "Allocation", "ApdMode", "CachePolicyKind", "CommitPolicyKind", "DecodeConfig", "DecodeResult",
           "GenerationResult", "Pipeline", "Proxy", "Remasking", "decode", "method_config"]
