"""The fused path (dllm.kernels) decodes exactly what the plain path decodes, for every cache and commit
method, on LLaDA and Dream, in regimes where several tokens commit per step; and a step's body has no
host sync, so it can be captured as one CUDA graph."""

import contextlib

import pytest
import torch

from dllm.engines.engine_set import torch_engine_set
from dllm.kernels._triton import HAVE_TRITON
from dllm.runtime import DecodeConfig, decode, method_config
from dllm.runtime.executor import Executor, SlotStep
from dllm.runtime.view import StepView

METHODS = ["full", "prefix", "dual", "dllm-cache", "dcu", "dcu-reference", "full+threshold", "dual+threshold",
           "dcu+factor", "full+apd", "dcu+apd", "dcu+apd@global", "dcu@proportional"]


def _config(method: str) -> DecodeConfig:
    # low thresholds and tau0: several tokens per step; small budgets so DCU really selects rows
    base = DecodeConfig(gen_length=32, block_length=8, steps=16, budget=4, window=4, threshold=0.3, factor=2.0,
                        tau0=0.4, beta=0.02, prompt_interval=3, gen_interval=5, allocation="uniform")
    name, _, variant = method.partition("@")
    cfg = method_config(name, base)
    if variant == "global":
        cfg = cfg.replace(apd_mode="global")
    elif variant == "proportional":
        cfg = cfg.replace(allocation="proportional")
    return cfg


def _prompt(arch):
    return torch.randint(6, 90, (1, 11), generator=torch.Generator().manual_seed(len(arch)))


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", METHODS)
def test_torch_fused_equals_plain(arch, method, tiny_models):
    model = tiny_models[arch]
    plain = torch_engine_set(model, "fp32", kernels="plain")
    fused = torch_engine_set(model, "fp32", kernels="torch")
    cfg = _config(method)
    want = decode(plain, _prompt(arch), cfg)
    got = decode(fused, _prompt(arch), cfg)
    assert got.ids == want.ids and got.rows_per_step == want.rows_per_step
    assert got.tokens_per_step == want.tokens_per_step
    if cfg.commit.value != "schedule":
        assert max(want.tokens_per_step) > 1                            # the multi-commit regime


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", ["dcu", "dcu+apd", "dllm-cache", "dual+threshold"])
def test_onnxruntime_fused_equals_plain(arch, method, engine_dirs):
    from dllm.engines.loader import open_engine_dir

    plain = open_engine_dir(engine_dirs[arch], "onnxruntime", "cpu", kernels="plain", intra_op_threads=1)
    fused = open_engine_dir(engine_dirs[arch], "onnxruntime", "cpu", kernels="torch", intra_op_threads=1)
    cfg = _config(method)
    want, got = decode(plain, _prompt(arch), cfg), decode(fused, _prompt(arch), cfg)
    assert got.ids == want.ids and got.rows_per_step == want.rows_per_step


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("method", ["dcu+apd", "dcu-reference", "dual+threshold"])
def test_triton_kernels_decode_what_the_plain_path_decodes(arch, method, tiny_models):
    """Every Triton kernel inside real decoding (Triton's interpreter on the CPU): same tokens, same rows."""
    model = tiny_models[arch]
    plain = torch_engine_set(model, "fp32", kernels="plain")
    tri = torch_engine_set(model, "fp32", kernels="triton")
    cfg = _config(method).replace(gen_length=16, steps=8)
    want, got = decode(plain, _prompt(arch), cfg), decode(tri, _prompt(arch), cfg)
    assert got.ids == want.ids and got.rows_per_step == want.rows_per_step
    assert tri.ops.launches > 0


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_split_kv_batches_exactly_and_full_schedule_keeps_the_reference(arch, tiny_models, monkeypatch):
    """The split-KV kernel's sums do not depend on the batch: each sequence of a batch decodes what it decodes
    alone; and ``full`` + ``schedule`` still gives the plain path's tokens."""
    from dllm.runtime.loop import decode_batch

    model = tiny_models[arch]
    tri = torch_engine_set(model, "fp32", kernels="triton")
    tri.ops.split_kv = True
    ran = _count_split_kv(monkeypatch)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(6, 90, (n,), generator=g).tolist() for n in (5, 13)]
    cfg = _config("dcu+apd").replace(gen_length=8, steps=8)
    solo = [decode(tri, p, cfg) for p in prompts]
    for a, b in zip(solo, decode_batch(tri, prompts, cfg, batch_size=2)):
        assert b.ids == a.ids and b.rows_per_step == a.rows_per_step and b.commit_step == a.commit_step
    full = _config("full").replace(gen_length=8, steps=8)
    plain = torch_engine_set(model, "fp32", kernels="plain")
    assert decode(tri, prompts[1], full).ids == decode(plain, prompts[1], full).ids
    assert len(ran) > 0


def _count_split_kv(monkeypatch) -> list:
    """Record each launch of the split-KV kernel (returned list grows by one per call)."""
    from dllm.kernels import ops

    twin, kernel = ops._KERNELS["attention"]
    ran = []
    monkeypatch.setitem(ops._KERNELS, "attention", (twin, lambda *a, **k: ran.append(1) or kernel(*a, **k)))
    return ran


@contextlib.contextmanager
def no_host_sync():
    """Make every tensor-to-host read raise: a step body that passes can be recorded as a CUDA graph."""
    names = ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host sync inside a step body: Tensor.{name}")
        return f

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _host_state(obj) -> dict:
    """An object's host-side values (what a replayed CUDA graph cannot change). None-valued attributes are
    slots for device buffers made lazily on the first eager run, which captures never precede."""
    return {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float, str, tuple))}


@pytest.mark.parametrize("kernels", ["torch", "plain"])
@pytest.mark.parametrize("method", ["full", "dcu", "dcu+apd", "dual+threshold", "prefix+factor", "dllm-cache",
                                    "dcu-reference", "dcu@proportional", "dcu+apd@global"])
def test_step_bodies_have_no_host_sync(method, kernels, tiny_models):
    """What the executor captures (layers, head and a capturable commit) reads nothing back to the host and
    changes no host state of the policies: a replayed graph runs none of that Python."""
    engines = torch_engine_set(tiny_models["llada"], "fp32", kernels=kernels)
    ex = Executor(engines)
    cfg = _config(method)
    spec = engines.spec
    P, G = 11, cfg.gen_length
    cache, commit = ex.cache_policy(cfg, spec), ex.commit_policy(cfg, spec)
    cache.reset(spec.n_layers, P, G, torch.device("cpu"))
    ex.reset(1, P, P + G, cache)
    commit.reset(1, P, G, spec.vocab_size, torch.device("cpu"), torch.Generator())
    ex.canvas.fill_(spec.mask_id)
    ex.canvas[:, :P] = _prompt("llada")
    view = StepView(prompt_len=P, canvas_len=P + G, key_pos=P - 1, start=P, end=P + 8, block_masks=8)
    commit.begin_block(view)
    for i in range(3):
        view.step, view.step_in_block = i + 1, i
        cache.begin_step(view)
        lo, hi = commit.logit_range(view)
        assert commit.step_key(view) is not None                        # greedy commits are capturable
        steps = [SlotStep(cache, commit, view, lo, hi)]
        ex._prepare_rows(steps)                  # run_batch's host work before the step (DCU's window)
        before = (_host_state(cache), _host_state(commit))
        with no_host_sync():
            ex._step_body(steps, True, layer_graphs=False)
        assert (_host_state(cache), _host_state(commit)) == before
        committed = ex.read_committed(lo, hi)
        cache.after_step()
        commit.after_step(view)
        view.block_masks -= len(committed)
        view.key_pos = committed[-1] if committed else view.key_pos


class NoSyncBodies(Executor):
    """Runs every step body (what a CUDA graph would hold) and every commit (greedy here: a graph holds it
    too where the device allows) with host reads refused."""

    def _step_body(self, steps, commit, layer_graphs):
        with no_host_sync():
            return super()._step_body(steps, commit, layer_graphs)

    def _commit_all(self, steps, logits):
        with no_host_sync():
            return super()._commit_all(steps, logits)


@pytest.mark.parametrize("method", ["dcu", "dcu+apd", "dllm-cache", "dcu@proportional"])
def test_batched_step_bodies_have_no_host_sync(method, tiny_models):
    """A batch's step body, the one-launch row choice of every sequence and the batch's APD commit included,
    reads nothing back to the host, and the batch still decodes what each prompt decodes alone."""
    from dllm.runtime.loop import decode_batch

    engines = torch_engine_set(tiny_models["llada"], "fp32", kernels="torch")
    cfg = _config(method)
    prompts = [list(range(6, 17)), list(range(20, 27)), list(range(30, 39))]
    got = decode_batch(engines, prompts, cfg, executor=NoSyncBodies(engines), batch_size=3)
    assert [r.ids for r in got] == [decode(engines, p, cfg).ids for p in prompts]
