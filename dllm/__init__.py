"""dllm-deploy: export, engines and a fast runtime for diffusion LLMs (LLaDA, Dream).

Start here:

- ``dllm.runtime.Pipeline``: load an engine directory and generate.
      pipe = Pipeline.from_dir("tiny-engine")                 # ONNX Runtime on the CPU
      pipe.generate("What is 23+45?").text                     # the engine directory's defaults
      pipe.generate(prompt, method_config("dcu+apd", pipe.default_config()))
- ``dllm.runtime.DecodeConfig``: every decoding setting (gen length, block, steps, cache and commit
  policy); ``dllm.runtime.method_config("dcu+apd", base)`` applies a method name.
- Command lines (each has ``--help`` and ``--version``):
  ``dllm-export`` (checkpoint or Hugging Face repo id -> engine directory), ``dllm-run`` (generate),
  ``dllm-bench`` (methods side by side), ``dllm-eval`` (accuracy), ``dllm-demo`` (the shipped model end
  to end), ``dllm-train-tiny`` (train a small model).

Subpackages map onto the repository's top-level folders: ``dllm.exporter`` (exporter/),
``dllm.engines`` (engines/), ``dllm.runtime`` (runtime/), ``dllm.tools`` (tools/). Documentation:
README.md, docs/algorithms.md (decoding methods), docs/engine-dir.md (the on-disk format),
docs/benchmarks.md (measurements).
"""

__version__ = "0.1.0"
