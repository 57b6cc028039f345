"""Checkpoint round trips: write a tiny HF-layout checkpoint, load it, compare with a direct computation.

The direct computation below is deliberately independent of ``dllm.exporter.models``: it reads the raw
safetensors tensors by their Hugging Face names and config.json keys and runs the transformer in
float64 with plain tensor ops.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllm.errors import CheckpointError
from dllm.exporter.models import Checkpoint, load_checkpoint, spec_from_config, tiny_spec, write_tiny_checkpoint
from dllm.exporter.models.checkpoint import DREAM_EOS_IDS, DREAM_MASK_ID, LLADA_EOS_IDS, LLADA_MASK_ID
from dllm.spec import Arch

torch.set_num_threads(1)


# -- an independent transcription of both architectures ------------------------------------------
def raw_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return {k: v.to(torch.float64) for k, v in out.items()}


def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    """x [N, H, hd]; rotate-half convention, positions 0..N-1."""
    N, _, hd = x.shape
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(N, dtype=torch.float64)[:, None] * inv[None, :]       # [N, hd/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def direct_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] of one sequence ids [N], straight from config.json and the raw tensors."""
    cfg = json.loads((path / "config.json").read_text())
    t = raw_tensors(path)
    llada = cfg["model_type"].lower() == "llada"
    if llada:
        D, L, H = cfg["d_model"], cfg["n_layers"], cfg["n_heads"]
        Hkv, eps = cfg.get("n_kv_heads", H), cfg["rms_norm_eps"]
        emb, final, head = "model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"
    else:
        D, L, H = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        Hkv, eps = cfg["num_key_value_heads"], cfg["rms_norm_eps"]
        emb, final, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
    hd, theta, N = D // H, cfg["rope_theta"], ids.shape[0]

    h = t[emb][ids]                                                           # [N, D]
    for i in range(L):
        if llada:
            p = f"model.transformer.blocks.{i}."
            w = {k: t[p + v + ".weight"] for k, v in dict(an="attn_norm", q="q_proj", k="k_proj", v="v_proj",
                                                         o="attn_out", fn="ff_norm", g="ff_proj", u="up_proj",
                                                         d="ff_out").items()}
            bq = bk = bv = 0.0
        else:
            p = f"model.layers.{i}."
            w = {k: t[p + v + ".weight"] for k, v in dict(
                an="input_layernorm", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                o="self_attn.o_proj", fn="post_attention_layernorm", g="mlp.gate_proj", u="mlp.up_proj",
                d="mlp.down_proj").items()}
            bq, bk, bv = (t[p + f"self_attn.{n}_proj.bias"] for n in "qkv")
        a = rms(h, w["an"], eps)
        q = (a @ w["q"].T + bq).view(N, H, hd)
        k = (a @ w["k"].T + bk).view(N, Hkv, hd)
        v = (a @ w["v"].T + bv).view(N, Hkv, hd)
        q, k = rope(q, theta), rope(k, theta)
        # GQA: kv head j serves query heads j*g .. j*g+g-1
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5                  # [H, N, N], non-causal
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(N, H * hd)
        h = h + o @ w["o"].T
        n = rms(h, w["fn"], eps)
        g = n @ w["g"].T
        h = h + ((g * torch.sigmoid(g)) * (n @ w["u"].T)) @ w["d"].T
    logits = rms(h, t[final], eps) @ t[head].T                               # [N, V]
    if not llada:   # Dream: position i reads hidden state i-1, position 0 keeps its own
        logits = torch.cat([logits[:1], logits[:-1]], 0)
    return logits


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "llada": write_tiny_checkpoint(root / "llada", "llada", seed=1),
        "dream": write_tiny_checkpoint(root / "dream", "dream", seed=2),   # GQA 4 heads / 2 kv heads, q/k/v bias
        "llada_sharded": write_tiny_checkpoint(root / "llada3", "llada", seed=1, shards=3),
        "dream_sharded_bf16": write_tiny_checkpoint(root / "dream3", "dream", seed=2, shards=3,
                                                    dtype=torch.bfloat16),
    }


def ids_for(vocab: int, n: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llada", "dream", "llada_sharded", "dream_sharded_bf16"])
def test_loaded_model_matches_direct_computation(ckpts, name):
    path = ckpts[name]
    spec, model = load_checkpoint(path)
    assert model.dtype == torch.float32
    ids = ids_for(spec.vocab_size)
    got = model(ids)                                                          # [B, N, V]
    assert got.shape == (2, 11, spec.vocab_size)
    for b in range(2):
        want = direct_logits(path, ids[b])
        torch.testing.assert_close(got[b].double(), want, atol=2e-4, rtol=1e-4)


def test_dream_checkpoint_is_gqa_with_bias_and_shift(ckpts):
    ckpt = Checkpoint(ckpts["dream"])
    s = ckpt.spec
    assert (s.arch, s.n_heads, s.n_kv_heads, s.qkv_bias, s.logit_shift) == (Arch.DREAM, 4, 2, True, True)
    assert ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert "model.layers.1.self_attn.q_proj.bias" in ckpt.tensors
    # the shift: position 0 and 1 see the same hidden state
    logits = ckpt.load_model()(ids_for(s.vocab_size))
    torch.testing.assert_close(logits[:, 0], logits[:, 1])


def test_spec_round_trips(ckpts):
    for arch, name in [("llada", "llada"), ("dream", "dream")]:
        assert Checkpoint(ckpts[name]).spec == tiny_spec(arch)


def test_sharded_equals_single_file(ckpts):
    ckpt = Checkpoint(ckpts["llada_sharded"])
    index = json.loads((ckpts["llada_sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert len({info.file for info in ckpt.tensors.values()}) == 3
    ids = ids_for(ckpt.spec.vocab_size, seed=3)
    torch.testing.assert_close(ckpt.load_model()(ids), load_checkpoint(ckpts["llada"])[1](ids), atol=0, rtol=0)


def test_bf16_on_disk(ckpts):
    path = ckpts["dream_sharded_bf16"]
    ckpt = Checkpoint(path)
    assert {info.dtype for info in ckpt.tensors.values()} == {"BF16"}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # upcast on load; loading in bf16 keeps the stored values exactly
    layer32, layer16 = ckpt.load_layer(1, torch.float32), ckpt.load_layer(1, torch.bfloat16)
    assert layer16.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer32.q_proj.weight, layer16.q_proj.weight.float(), atol=0, rtol=0)
    ids = ids_for(ckpt.spec.vocab_size)
    ref = ckpt.load_model(torch.float32)(ids)
    low = ckpt.load_model(torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    assert (ref.argmax(-1) == low.float().argmax(-1)).float().mean() > 0.8


def test_layer_by_layer_loading_equals_whole_model(ckpts):
    ckpt = Checkpoint(ckpts["llada"])
    model = ckpt.load_model()
    ids = ids_for(ckpt.spec.vocab_size)
    h = ckpt.load_embed()(ids)
    for i in range(ckpt.spec.n_layers):
        h = ckpt.load_layer(i)(h)
    logits = ckpt.load_head()(ckpt.load_norm()(h))
    torch.testing.assert_close(logits, model(ids), atol=0, rtol=0)
    with pytest.raises(IndexError):
        ckpt.load_layer(ckpt.spec.n_layers)


# -- tokenizer and special ids ----------------------------------------------------------------------
@pytest.mark.parametrize("name,header", [("llada", "<|start_header_id|>assistant<|end_header_id|>"),
                                         ("dream", "<|im_start|>assistant")])
def test_tokenizer_loads_with_chat_template(ckpts, name, header, caplog):
    ckpt = Checkpoint(ckpts[name])
    tok = ckpt.tokenizer()
    assert tok.mask_token_id == ckpt.spec.mask_id
    assert tok.eos_token_id == ckpt.spec.eos_ids[0]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith(header)
    ids = tok("hello")["input_ids"]
    assert tok.decode(ids) == "hello"
    assert max(tok.get_vocab().values()) < ckpt.spec.vocab_size


def test_tokenizer_does_not_warn_about_model_type(ckpts, capfd):
    Checkpoint(ckpts["llada"]).tokenizer()
    assert "to instantiate a model of type" not in capfd.readouterr().err


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_special_ids_from_config(ckpts, name):
    cfg = _config(ckpts[name])
    cfg["mask_token_id"], cfg["eos_token_id"] = 7, [8, 9]
    spec, _ = spec_from_config(cfg, Path("config.json"))
    assert spec.mask_id == 7 and spec.eos_ids == (8, 9)
    cfg["eos_token_id"] = 8
    assert spec_from_config(cfg, Path("config.json"))[0].eos_ids == (8,)


@pytest.mark.parametrize("name,mask,eos,vocab", [("llada", LLADA_MASK_ID, LLADA_EOS_IDS, 126464),
                                                 ("dream", DREAM_MASK_ID, DREAM_EOS_IDS, 152064)])
def test_special_ids_default_when_absent(ckpts, name, mask, eos, vocab):
    cfg = _config(ckpts[name])
    del cfg["mask_token_id"], cfg["eos_token_id"]
    for key in ("vocab_size", "embedding_size"):
        if key in cfg:
            cfg[key] = vocab
    spec, _ = spec_from_config(cfg, Path("config.json"))
    assert spec.mask_id == mask and spec.eos_ids == eos


# -- bad inputs: each error names the file and the fix -----------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = _config(path)
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite(path: Path, fname: str, fn) -> None:
    from safetensors.torch import save_file
    tensors = load_file(str(path / fname))
    fn(tensors)
    save_file(tensors, str(path / fname), metadata={"format": "pt"})


def _raises(match_all, fn):
    with pytest.raises(CheckpointError) as e:
        fn()
    for m in match_all:
        assert m in str(e.value), f"{m!r} not in error: {e.value}"
    return e.value


def test_not_a_directory(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    _raises([str(f), "not a directory", "config.json"], lambda: Checkpoint(f))
    _raises([str(tmp_path / "nope"), "not a directory"], lambda: Checkpoint(tmp_path / "nope"))


def test_missing_config(ckpts, tmp_path):
    path = _copy(ckpts["llada"], tmp_path / "c")
    (path / "config.json").unlink()
    _raises([str(path / "config.json"), "missing", "needs config.json"], lambda: Checkpoint(path))


def test_config_not_json(ckpts, tmp_path):
    path = _copy(ckpts["llada"], tmp_path / "c")
    (path / "config.json").write_text("{not json")
    _raises([str(path / "config.json"), "not valid JSON"], lambda: Checkpoint(path))


def test_unknown_model_type(ckpts, tmp_path):
    path = _copy(ckpts["llada"], tmp_path / "c")
    _edit_config(path, model_type="gpt2")
    _raises([str(path / "config.json"), "'gpt2'", "expected 'llada'"], lambda: Checkpoint(path))


def test_missing_config_key(ckpts, tmp_path):
    path = _copy(ckpts["dream"], tmp_path / "c")
    cfg = _config(path)
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    _raises([str(path / "config.json"), "'hidden_size'"], lambda: Checkpoint(path))


def test_missing_tensor(ckpts, tmp_path):
    path = _copy(ckpts["llada"], tmp_path / "c")
    name = "model.transformer.blocks.1.up_proj.weight"
    _rewrite(path, "model.safetensors", lambda t: t.pop(name))
    ckpt = Checkpoint(path)   # headers only: opening is fine, loading names the tensor
    _raises([str(path), name, "missing"], ckpt.load_model)
    _raises([name], ckpt.check)


def test_misshaped_tensor(ckpts, tmp_path):
    path = _copy(ckpts["dream"], tmp_path / "c")
    name = "model.layers.0.self_attn.k_proj.weight"

    def widen(t):
        t[name] = torch.zeros(64, 64)   # as if MHA, but config.json says 2 kv heads
    _rewrite(path, "model.safetensors", widen)
    _raises([str(path / "model.safetensors"), name, "[64, 64]", "[32, 64]", "config and weights"],
            Checkpoint(path).load_model)


@pytest.mark.parametrize("keep", [4, 100, -10])
def test_truncated_safetensors(ckpts, tmp_path, keep):
    path = _copy(ckpts["llada"], tmp_path / "c")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep > 0 else data[:keep])
    _raises([str(f), "truncated", "re-download"], lambda: Checkpoint(path))


def test_truncated_shard(ckpts, tmp_path):
    path = _copy(ckpts["llada_sharded"], tmp_path / "c")
    f = path / "model-00002-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    _raises([str(f), "truncated"], lambda: Checkpoint(path))


def test_missing_shard(ckpts, tmp_path):
    path = _copy(ckpts["llada_sharded"], tmp_path / "c")
    f = path / "model-00003-of-00003.safetensors"
    f.unlink()
    _raises([str(f), "missing", "download"], lambda: Checkpoint(path))


def test_index_without_weight_map(ckpts, tmp_path):
    path = _copy(ckpts["llada_sharded"], tmp_path / "c")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _raises([str(path / "model.safetensors.index.json"), "weight_map"], lambda: Checkpoint(path))


def test_no_weights(ckpts, tmp_path):
    path = _copy(ckpts["llada"], tmp_path / "c")
    (path / "model.safetensors").unlink()
    _raises([str(path), "no model.safetensors"], lambda: Checkpoint(path))


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_mask_id_outside_vocabulary(ckpts, tmp_path, name):
    path = _copy(ckpts[name], tmp_path / "c")
    _edit_config(path, mask_token_id=5000)
    _raises([str(path / "config.json"), "mask id 5000", "outside the vocabulary", "set mask_token_id"],
            lambda: Checkpoint(path))


def test_default_mask_id_outside_tiny_vocabulary(ckpts, tmp_path):
    """A tiny vocabulary with no mask_token_id falls back to LLaDA's 126336, which it cannot hold."""
    path = _copy(ckpts["llada"], tmp_path / "c")
    cfg = _config(path)
    del cfg["mask_token_id"]
    (path / "config.json").write_text(json.dumps(cfg))
    _raises([str(path / "config.json"), str(LLADA_MASK_ID), "set mask_token_id"], lambda: Checkpoint(path))


def test_missing_tokenizer(ckpts, tmp_path):
    path = _copy(ckpts["llada"], tmp_path / "c")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).unlink()
    _raises([str(path), "tokenizer"], Checkpoint(path).tokenizer)
