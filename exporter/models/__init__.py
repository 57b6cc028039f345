"""Own PyTorch definitions of LLaDA and Dream, their checkpoint loader and writer."""

from dllm.exporter.models.checkpoint import Checkpoint, load_checkpoint, spec_from_config
from dllm.exporter.models.layers import DecoderLayer, RMSNorm
from dllm.exporter.models.model import DiffusionLM
from dllm.exporter.models.writer import (build_tokenizer, save_checkpoint, tiny_spec,
                                         write_tiny_checkpoint)

__all__ = ["Checkpoint", "DecoderLayer", "DiffusionLM", "RMSNorm", "build_tokenizer", "load_checkpoint",
           "save_checkpoint", "spec_from_config", "tiny_spec", "write_tiny_checkpoint"]
