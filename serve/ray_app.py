"""Scale-out on Ray Serve: the same FastAPI app as an ingress deployment, one Pipeline per replica.

    deployment(config, ray_cfg)      # a Ray Serve deployment (not yet running)
    deploy(config, ray_cfg)          # run it on the connected cluster behind Serve's HTTP proxy; its URL

Each replica builds the app itself (``serve.ingress`` with a builder function) and loads its own
Pipeline at startup, on its own GPU when ``num_gpus`` is 1 (Ray sets CUDA_VISIBLE_DEVICES per replica).
Ray Serve's proxy spreads requests over replicas; within a replica the scheduler queues as usual.
Replica ids (``X-Dllm-Replica``) are Ray Serve's.
"""

from __future__ import annotations

import functools

from ray import serve

from dllm.errors import ConfigError
from dllm.serve.app import ServerState, build_app, load_state
from dllm.serve.config import RayConfig, ServeConfig

APP_NAME = "dllm"


def replica_state(config: ServeConfig) -> ServerState:
    """Load this replica's model; its id is Ray Serve's replica id."""
    try:
        replica = f"ray-{serve.get_replica_context().replica_id.unique_id}"
    except Exception:       # noqa: BLE001 - outside a replica (never in a deployment)
        replica = None
    return load_state(config, replica=replica)


class DllmReplica:
    """One Ray Serve replica of dllm-serve; its routes are the app's."""


def deployment(config: ServeConfig, ray_cfg: RayConfig):
    """The Ray Serve deployment of the dllm-serve app with ``ray_cfg``'s replicas and resources."""

    def build_replica_app():              # runs inside each replica
        return build_app(functools.partial(replica_state, config))

    options = {"name": APP_NAME, "ray_actor_options": {"num_cpus": ray_cfg.num_cpus, "num_gpus": ray_cfg.num_gpus}}
    if ray_cfg.autoscaling is not None:
        options["autoscaling_config"] = _checked_autoscaling(ray_cfg.autoscaling)
    else:
        options["num_replicas"] = ray_cfg.replicas
    if ray_cfg.max_ongoing_requests is not None:
        options["max_ongoing_requests"] = ray_cfg.max_ongoing_requests
    try:
        return serve.deployment(**options)(serve.ingress(build_replica_app)(DllmReplica))
    except ValueError as e:               # Ray Serve's own checks (pydantic), e.g. min_replicas > max_replicas
        detail = " ".join(line.strip() for line in str(e).splitlines()[:3])
        raise ConfigError(f"Ray Serve rejected the deployment settings: {detail}") from None


def _checked_autoscaling(autoscaling) -> dict:
    """The autoscaling_config as given; keys Ray Serve does not know are an error (it would ignore them)."""
    from ray.serve.config import AutoscalingConfig

    fields = getattr(AutoscalingConfig, "model_fields", None) or AutoscalingConfig.__fields__
    unknown = sorted(set(autoscaling) - set(fields))
    if unknown:
        raise ConfigError(f"--autoscaling has keys Ray Serve does not know: {unknown}; expected some of "
                          f"{sorted(fields)}")
    return dict(autoscaling)


def deploy(config: ServeConfig, ray_cfg: RayConfig) -> str:
    """Run the deployment on the connected Ray cluster (``ray.init`` first); Serve's HTTP proxy listens
    on ``config.host:config.port``. Returns its URL once every replica is up."""
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(deployment(config, ray_cfg).bind(), name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}"


def shutdown() -> None:
    """Remove the deployment and stop Serve on the connected cluster."""
    serve.shutdown()
