"""dllm.serve: an OpenAI-compatible HTTP server over ``dllm.runtime.Pipeline`` (the ``serve`` extra).

    dllm-serve ENGINE_DIR --port 8000                     # uvicorn, one decode worker
    dllm-serve ENGINE_DIR --ray --replicas 2              # Ray Serve, one Pipeline per replica

| module | job |
|---|---|
| ``config`` | ServeConfig (model, default decoding, address) and RayConfig (replicas, resources, autoscaling) |
| ``protocol`` | OpenAI request bodies and response/chunk/error JSON |
| ``requests`` | request body -> prompt ids + DecodeConfig (the ``dllm`` extension object), with 4xx errors |
| ``jobs`` | a request in flight: its events, and canvas -> committed-prefix text deltas |
| ``scheduler`` | the queue and the one decode worker; runners decide how a batch is decoded |
| ``metrics`` | Prometheus metrics |
| ``app`` | the FastAPI app (routes, streaming, errors) and the per-server state |
| ``server`` | the app under uvicorn (foreground or a background thread) |
| ``ray_app`` | the same app as a Ray Serve deployment |
| ``cli`` | ``dllm-serve`` |
"""

from dllm.serve.config import RayConfig, ServeConfig, Source

__all__ = ["RayConfig", "ServeConfig", "Source"]
