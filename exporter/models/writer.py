"""Write checkpoints in the exact Hugging Face layout of LLaDA and Dream.

Used by the tests (tiny seeded random models), by the small-model trainer and by demos.
The output is indistinguishable in layout from a real checkpoint: the same config keys,
tensor names, shard index and tokenizer files, so the loader and ``dllm-export`` treat
it like any other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dllm.spec import Arch, ModelSpec
from dllm.exporter.models.checkpoint import _DREAM_LAYER, _LLADA_LAYER
from dllm.exporter.models.model import DiffusionLM

# Character-level tokenizer: printable ASCII plus newline, after the special tokens.
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]

# Special tokens; names follow each model family's real tokenizer.
LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
DREAM_SPECIALS = ["<|beginoftext|>", "<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]

LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(arch: Arch):
    """A character-level PreTrainedTokenizerFast with the family's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = LLADA_SPECIALS if arch == Arch.LLADA else DREAM_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, newline too
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    if arch == Arch.LLADA:
        kw = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  mask_token="<|mdm_mask|>", chat_template=LLADA_CHAT_TEMPLATE)
    else:
        kw = dict(bos_token="<|beginoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  mask_token="<|mask|>", chat_template=DREAM_CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(tokenizer_object=core, **kw)


def tiny_spec(arch: Arch | str, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
              n_kv_heads: int | None = None, mlp_hidden: int = 128, max_seq_len: int = 512,
              vocab_size: int | None = None) -> ModelSpec:
    """A small spec whose special-token ids match ``build_tokenizer(arch)``."""
    arch = Arch(arch)
    if arch == Arch.LLADA:
        specials, mask, eos = LLADA_SPECIALS, 2, (1, 5)
        kv = n_heads if n_kv_heads is None else n_kv_heads
    else:
        specials, mask, eos = DREAM_SPECIALS, 2, (1, 4)
        kv = max(1, n_heads // 2) if n_kv_heads is None else n_kv_heads
    vocab = vocab_size or len(specials) + len(CHARS)
    return ModelSpec(arch=arch, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=kv,
                     head_dim=d_model // n_heads, mlp_hidden=mlp_hidden, vocab_size=vocab,
                     max_seq_len=max_seq_len, rope_theta=10000.0 if arch == Arch.DREAM else 500000.0,
                     norm_eps=1e-6 if arch == Arch.DREAM else 1e-5, qkv_bias=arch == Arch.DREAM,
                     mask_id=mask, eos_ids=eos, logit_shift=arch == Arch.DREAM, bos_id=0)


def _eos_value(spec: ModelSpec):
    """One id as an int (the usual HF form), several as a list (also valid HF), so none is lost."""
    return spec.eos_ids[0] if len(spec.eos_ids) == 1 else list(spec.eos_ids)


def hf_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    """config.json contents with each family's real keys."""
    dtype_name = str(dtype).removeprefix("torch.")
    if spec.arch == Arch.LLADA:
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
            "alibi": False, "attention_layer_norm": False, "block_type": "llama", "block_group_size": 1,
            "d_model": spec.d_model, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
            "n_kv_heads": spec.n_kv_heads, "mlp_hidden_size": spec.mlp_hidden,
            "mlp_ratio": max(1, spec.mlp_hidden // spec.d_model),
            "vocab_size": spec.vocab_size, "embedding_size": spec.vocab_size,
            "max_sequence_length": spec.max_seq_len, "rope": True, "rope_theta": spec.rope_theta,
            "rope_full_precision": True, "rms_norm_eps": spec.norm_eps, "layer_norm_type": "rms",
            "include_bias": False, "include_qkv_bias": spec.qkv_bias, "weight_tying": False,
            "scale_logits": False, "input_emb_norm": False, "use_cache": False,
            "mask_token_id": spec.mask_id, "eos_token_id": _eos_value(spec), "pad_token_id": spec.eos_ids[0],
            "bos_token_id": spec.bos_id, "torch_dtype": dtype_name,
        }
    return {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
        "hidden_size": spec.d_model, "intermediate_size": spec.mlp_hidden,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_seq_len, "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.norm_eps, "tie_word_embeddings": False, "use_cache": False,
        "mask_token_id": spec.mask_id, "eos_token_id": _eos_value(spec), "pad_token_id": spec.eos_ids[0],
        "bos_token_id": spec.bos_id, "torch_dtype": dtype_name,
    }


def hf_state_dict(model: DiffusionLM) -> dict[str, torch.Tensor]:
    """The model's weights under the family's Hugging Face tensor names."""
    spec = model.spec
    if spec.arch == Arch.LLADA:
        out = {"model.transformer.wte.weight": model.embed.weight,
               "model.transformer.ln_f.weight": model.norm.weight,
               "model.transformer.ff_out.weight": model.lm_head.weight}
        prefix, mapping = "model.transformer.blocks.{i}.", _LLADA_LAYER
    else:
        out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
               "lm_head.weight": model.lm_head.weight}
        prefix, mapping = "model.layers.{i}.", _DREAM_LAYER
    for i, layer in enumerate(model.layers):
        for ours, theirs in mapping.items():
            if ours.endswith(".bias") and not spec.qkv_bias:
                continue
            out[prefix.format(i=i) + theirs] = layer.get_parameter(ours)
    return {k: v.detach().contiguous() for k, v in out.items()}


def make_tokenizer_portable(path: str | os.PathLike) -> None:
    """Make saved tokenizer files load on every transformers version the project declares (4.44 on):
    transformers 5 names the class ``TokenizersBackend`` and keeps the chat template only in
    ``chat_template.jinja``, which 4.x does not know; ``PreTrainedTokenizerFast`` and an inline
    ``chat_template`` read the same on both."""
    config_path = Path(path) / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    template = Path(path) / "chat_template.jinja"
    if template.is_file() and "chat_template" not in config:
        config["chat_template"] = template.read_text()
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def save_checkpoint(model: DiffusionLM, path: str | os.PathLike, *, tokenizer=None, shards: int = 1,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.dtype
    state = {k: v.to(dtype) for k, v in hf_state_dict(model).items()}
    (path / "config.json").write_text(json.dumps(hf_config(model.spec, dtype), indent=2))
    names = list(state)
    if shards <= 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: state[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tokenizer or build_tokenizer(model.spec.arch)).save_pretrained(str(path))
    make_tokenizer_portable(path)
    return path


def init_weights(model: DiffusionLM, seed: int, std: float = 0.02) -> DiffusionLM:
    """Seeded normal init (norm weights at 1), reproducible across machines."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
    return model


def write_tiny_checkpoint(path: str | os.PathLike, arch: Arch | str = "llada", *, seed: int = 0,
                          shards: int = 1, dtype: torch.dtype = torch.float32, std: float = 0.5,
                          **spec_kw) -> Path:
    """Write a tiny seeded random LLaDA- or Dream-layout checkpoint; returns its directory.

    ``std`` defaults high so that random models have peaked, tie-free distributions.
    """
    spec = tiny_spec(arch, **spec_kw)
    model = init_weights(DiffusionLM(spec), seed, std)
    return save_checkpoint(model, path, shards=shards, dtype=dtype)
