"""dllm-serve: an OpenAI-compatible server for an engine directory (or, with the torch backend, a
checkpoint directory). Thin: flags -> ServeConfig (+ RayConfig) -> run_server / Ray Serve.

    dllm-serve llada-engines --port 8000
    dllm-serve --checkpoint /models/LLaDA-8B-Instruct --device cuda
    dllm-serve llada-engines --device cuda --backend tensorrt --ray --replicas 4 --gpus-per-replica 1
    dllm-serve llada-engines --ray --autoscaling '{"min_replicas": 1, "max_replicas": 4}'
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from dllm.errors import ConfigError, DllmError

_SERVE_EXTRA = "dllm-serve needs the serve extra: pip install 'dllm-deploy[serve]' (or pip install -e \".[serve]\")"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dllm-serve", description="Serve a diffusion LLM behind an OpenAI-compatible "
                                "HTTP API (chat and text completions, streaming, /metrics).")
    p.add_argument("engine_dir", nargs="?", help="engine directory from dllm-export")
    p.add_argument("--checkpoint", help="serve a Hugging Face checkpoint directory instead (torch backend)")
    p.add_argument("--backend", choices=["onnxruntime", "torch", "tensorrt"],
                   help="engine backend (default onnxruntime; torch with --checkpoint)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the backend, 0 = every core (default 1)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="--checkpoint weights (default fp32)")
    p.add_argument("--model-name", default="", help="the model id clients send (default: the directory's name)")
    p.add_argument("--method", default="dcu+apd", help="default decoding method, CACHE or CACHE+COMMIT "
                   "(default dcu+apd); requests override it with dllm.method")
    p.add_argument("--block-length", type=int, default=32, help="default block length (default 32)")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of requests that send none (default 256)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 503 (default 256)")
    p.add_argument("--max-batch", type=int, help="requests decoded together in one step, each with exactly its own "
                   "tokens (default: the engines' --max-batch on CUDA, 1 on the CPU, where a batch costs about as "
                   "much as its requests one after another)")
    p.add_argument("--cuda-graphs", action="store_true", help="torch backend on CUDA: capture each step (or layer) "
                   "as a CUDA graph once its shape repeats and replay it, instead of launching every kernel")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = p.add_argument_group("scale-out on Ray Serve")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve, one Pipeline per replica")
    ray.add_argument("--replicas", type=int, help="replicas (default 1; not with --autoscaling)")
    ray.add_argument("--autoscaling", help="Ray Serve autoscaling_config as JSON, passed through, e.g. "
                     "'{\"min_replicas\": 1, \"max_replicas\": 4, \"target_ongoing_requests\": 2}'")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, help="GPUs each replica reserves (default 1 with "
                     "--device cuda, else 0)")
    ray.add_argument("--max-ongoing-requests", type=int, help="Ray Serve's per-replica request limit")
    ray.add_argument("--ray-address", help="join this Ray cluster ('auto', 'ray://host:10001'); default: start one")
    return p


def configs_from_args(args: argparse.Namespace):
    """ServeConfig, and RayConfig when --ray (else None), from the parsed flags."""
    from dllm.serve.config import RayConfig, ServeConfig, Source

    if (args.engine_dir is None) == (args.checkpoint is None):
        raise ConfigError("pass an engine directory (dllm-serve ENGINE_DIR) or --checkpoint DIR, exactly one")
    source = Source.CHECKPOINT if args.checkpoint else Source.ENGINE_DIR
    backend = args.backend or ("torch" if args.checkpoint else "onnxruntime")
    config = ServeConfig(path=args.checkpoint or args.engine_dir, source=source, backend=backend, device=args.device,
                         threads=args.threads, dtype=args.dtype, model_name=args.model_name, method=args.method,
                         block_length=args.block_length, max_tokens=args.max_tokens, max_queue=args.max_queue,
                         max_batch=args.max_batch, cuda_graphs=args.cuda_graphs,
                         host=args.host, port=args.port)
    ray_flags = [f for f in ("replicas", "autoscaling", "gpus_per_replica", "max_ongoing_requests", "ray_address")
                 if getattr(args, f) is not None]
    if not args.ray:
        if ray_flags:
            raise ConfigError(f"--{ray_flags[0].replace('_', '-')} is a Ray Serve setting; add --ray")
        return config, None
    autoscaling = None
    if args.autoscaling is not None:
        try:
            autoscaling = json.loads(args.autoscaling)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--autoscaling is not valid JSON ({e}); pass an object such as "
                              "'{\"min_replicas\": 1, \"max_replicas\": 4}'") from None
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if args.device.startswith("cuda") else 0.0
    replicas = args.replicas if args.replicas is not None or autoscaling is not None else 1
    return config, RayConfig(replicas=replicas, autoscaling=autoscaling, num_cpus=args.cpus_per_replica,
                             num_gpus=gpus, max_ongoing_requests=args.max_ongoing_requests, address=args.ray_address)


def run_on_ray(config, ray_cfg) -> None:
    """Start (or join) a Ray cluster, deploy, and serve until SIGINT/SIGTERM."""
    import ray

    from dllm.serve import ray_app

    ray.init(address=ray_cfg.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = ray_app.deploy(config, ray_cfg)
        how = (f"{ray_cfg.replicas} replicas" if ray_cfg.autoscaling is None
               else f"autoscaling {json.dumps(ray_cfg.autoscaling)}")
        print(f"dllm-serve: {config.model_name} on {url} through Ray Serve ({how}); Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        ray_app.shutdown()
        ray.shutdown()


def run(args: argparse.Namespace) -> int:
    config, ray_cfg = configs_from_args(args)
    try:
        if ray_cfg is not None:
            import ray.serve  # noqa: F401
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError(_SERVE_EXTRA) from None
    if ray_cfg is not None:
        run_on_ray(config, ray_cfg)
    else:
        from dllm.serve.server import run_server
        run_server(config, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DllmError as e:
        print(f"dllm-serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
