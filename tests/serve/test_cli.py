"""dllm-serve: flags -> configs, one-line errors, the real command in a subprocess, and --checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dllm.runtime import DecodeConfig, method_config

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from dllm.serve import cli  # noqa: E402
from dllm.serve.config import RayConfig, Source  # noqa: E402

MSG = [{"role": "user", "content": "What is 47+38?"}]


def parse(*argv):
    return cli.configs_from_args(cli.build_parser().parse_args(list(argv)))


def test_flags_make_the_configs(tmp_path):
    config, ray_cfg = parse(str(tmp_path), "--method", "full", "--block-length", "16", "--max-tokens", "40",
                            "--port", "9001", "--threads", "2")
    assert ray_cfg is None and config.source == Source.ENGINE_DIR and config.backend.value == "onnxruntime"
    assert config.model_name == tmp_path.name and config.port == 9001 and config.threads == 2
    assert config.max_batch is None                                              # auto: see serving_batch
    assert parse(str(tmp_path), "--max-batch", "4")[0].max_batch == 4
    assert not config.cuda_graphs
    assert parse("--checkpoint", str(tmp_path), "--device", "cuda:0", "--cuda-graphs")[0].cuda_graphs
    assert config.default_decode_config() == method_config("full", DecodeConfig(gen_length=48, block_length=16,
                                                                                steps=48))
    config, ray_cfg = parse("--checkpoint", str(tmp_path), "--ray", "--replicas", "3", "--device", "cuda",
                            "--model-name", "llada")
    assert config.source == Source.CHECKPOINT and config.backend.value == "torch" and config.model_name == "llada"
    assert ray_cfg == RayConfig(replicas=3, num_cpus=1.0, num_gpus=1.0)          # a GPU per replica on cuda
    _, ray_cfg = parse(str(tmp_path), "--ray", "--autoscaling", '{"min_replicas": 1, "max_replicas": 4}',
                       "--cpus-per-replica", "0.5", "--max-ongoing-requests", "8")
    assert ray_cfg.replicas is None and ray_cfg.autoscaling == {"min_replicas": 1, "max_replicas": 4}
    assert ray_cfg.num_cpus == 0.5 and ray_cfg.num_gpus == 0.0 and ray_cfg.max_ongoing_requests == 8


@pytest.mark.parametrize("argv,word", [
    ([], "exactly one"),
    (["ENGINE", "--checkpoint", "CKPT"], "exactly one"),
    (["--checkpoint", "CKPT", "--backend", "onnxruntime"], "dllm-export"),
    (["ENGINE", "--replicas", "2"], "add --ray"),
    (["ENGINE", "--ray", "--autoscaling", "{min: 1}"], "not valid JSON"),
    (["ENGINE", "--ray", "--autoscaling", "[1]"], "JSON object"),
    (["ENGINE", "--ray", "--replicas", "2", "--autoscaling", "{}"], "not both"),
    (["ENGINE", "--ray", "--replicas", "0"], "--replicas"),
    (["ENGINE", "--method", "fast"], "unknown cache policy"),
    (["ENGINE", "--max-tokens", "0"], "--max-tokens"),
    (["ENGINE", "--max-batch", "0"], "--max-batch must be an integer >= 1"),
    (["ENGINE", "--cuda-graphs", "--device", "cuda"], "use --backend torch"),
    (["--checkpoint", "CKPT", "--cuda-graphs"], "with --device cuda"),
    (["/no/such/dir"], "not a directory"),
])
def test_bad_flags_get_one_line_errors(argv, word, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dllm-serve: error: ") and word in err and err.count("\n") == 1


def test_a_checkpoint_is_not_an_engine_directory(capsys):
    from dllm.tools.assets import shipped_model_dir

    assert cli.main([str(shipped_model_dir())]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command_serves_a_streaming_openai_client(shipped_engine_dir, reference_pipeline):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dllm.serve.cli", str(shipped_engine_dir), "--port", str(port),
                             "--max-tokens", "32", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "dllm-serve did not come up in 120 s"
            time.sleep(0.25)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="tiny-llada", messages=MSG, stream=True)
        want = reference_pipeline.generate(MSG, method_config("dcu+apd", DecodeConfig(gen_length=32, steps=32)))
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text == "85"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


def test_a_checkpoint_on_the_torch_backend():
    from dllm.runtime import Pipeline
    from dllm.serve.config import ServeConfig
    from dllm.serve.server import BackgroundServer
    from dllm.tools.assets import shipped_model_dir

    config = ServeConfig(shipped_model_dir(), source="checkpoint", backend="torch", port=0, method="full",
                         max_tokens=32)
    want = Pipeline.from_checkpoint(shipped_model_dir()).generate(
        MSG, method_config("full", DecodeConfig(gen_length=32, steps=32)))
    with BackgroundServer(config) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-llada"]
        out = client.chat.completions.create(model="tiny-llada", messages=MSG)
    assert out.choices[0].message.content == want.text == "85"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_a_checkpoint_with_cuda_graphs_answers_concurrent_requests_as_alone():
    """--cuda-graphs on the GPU: requests decoded together (captured and replayed steps, arrivals of
    different lengths) each get the answer the pipeline gives alone, eagerly."""
    from concurrent.futures import ThreadPoolExecutor

    from dllm.runtime import Pipeline
    from dllm.serve.config import ServeConfig
    from dllm.serve.server import BackgroundServer
    from dllm.tools.assets import shipped_model_dir

    config = ServeConfig(shipped_model_dir(), source="checkpoint", backend="torch", device="cuda", port=0,
                         method="dcu+apd", max_tokens=32, max_batch=4, cuda_graphs=True)
    questions = [f"What is {a}+{b}?" for a, b in ((47, 38), (5, 7), (120, 33), (9, 90), (61, 2), (18, 18))]
    eager = Pipeline.from_checkpoint(shipped_model_dir(), device="cuda")
    want = [eager.generate([{"role": "user", "content": q}], config.default_decode_config()).text for q in questions]
    with BackgroundServer(config) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        def ask(q):
            out = client.chat.completions.create(model="tiny-llada", messages=[{"role": "user", "content": q}])
            return out.choices[0].message.content
        for _ in range(2):                          # the second round replays what the first captured
            with ThreadPoolExecutor(len(questions)) as pool:
                assert list(pool.map(ask, questions)) == want
