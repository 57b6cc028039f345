"""Running the app under uvicorn: in the foreground (dllm-serve) or on a background thread
(embedding, tests). The model is loaded before the socket opens, so a bad path fails fast."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from dllm.serve.app import ServerState, build_app, load_state
from dllm.serve.config import ServeConfig


def run_server(config: ServeConfig, log_level: str = "info") -> None:
    """Load the model, then serve on ``config.host:config.port`` until interrupted."""
    state = load_state(config)
    uvicorn.run(build_app(lambda: state), host=config.host, port=config.port, log_level=log_level,
                lifespan="on", timeout_graceful_shutdown=5)


class BackgroundServer:
    """The app on a daemon thread, bound to ``config.host`` and a free port (``config.port`` 0) or the
    given one. ``with BackgroundServer(cfg) as srv: srv.url``; leaving the block stops it."""

    def __init__(self, config: ServeConfig, state: ServerState | None = None, log_level: str = "warning"):
        self.state = state or load_state(config)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((config.host, config.port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{config.host}:{self.port}"
        state = self.state
        self.server = uvicorn.Server(uvicorn.Config(build_app(lambda: state), log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="dllm-serve-http", daemon=True)

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
