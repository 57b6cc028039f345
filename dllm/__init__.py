"""dllm: export, engines and a fast runtime for diffusion LLMs (LLaDA, Dream).

Subpackages map onto the repository's top-level folders:
``dllm.exporter`` (exporter/), ``dllm.engines`` (engines/),
``dllm.runtime`` (runtime/), ``dllm.tools`` (tools/).
"""

__version__ = "0.1.0"
