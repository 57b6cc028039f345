"""dllm.runtime: one decode loop over engines, with cache and commit policies.

>>> from dllm.runtime import Pipeline, DecodeConfig, method_config
>>> pipe = Pipeline.from_dir("out/", backend="onnxruntime")
>>> pipe.generate("What is 12+7?").text                  # the engine directory's generation defaults
>>> pipe.generate("What is 12+7?", method_config("dcu+apd", pipe.default_config())).text

``decode(engines, prompt_ids, cfg)`` is the ids-only loop under the Pipeline. The decoding methods,
their knobs and which one to pick: docs/algorithms.md.

Names are imported on first use, so ``dllm.runtime.config`` (and the command lines' ``--help``)
load without torch.
"""

import importlib

_EXPORTS = {
    "Alg": "config", "Allocation": "config", "ApdMode": "config", "CachePolicyKind": "config",
    "CommitPolicyKind": "config", "DecodeConfig": "config", "Proxy": "config", "Remasking": "config",
    "BatchDecoder": "loop", "DecodeResult": "loop", "decode": "loop", "method_config": "methods",
    "GenerationResult": "pipeline", "Pipeline": "pipeline", "CommittedText": "text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dllm.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dllm.runtime.{_EXPORTS[name]}"), name)


def __dir__():
    return __all__
