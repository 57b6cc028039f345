"""CUDA graphs keyed by what fixes their work: captured the second time a key is seen, then replayed.

The executor captures two kinds of units (runtime/executor.py): a whole step (embedding, every layer,
the head and, where the commit policy allows, its commit decision) and, for steps whose shape does not
repeat, single layers. A key holds every host-side value the unit's kernels depend on (row counts,
flags, block bounds); everything else the kernels read lives in persistent device buffers.

Capture only records kernels: the unit has just run eagerly for the same key, so its kernels are
compiled and its lazily made buffers exist. All graphs share one memory pool; they replay one at a
time on one stream.
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphCache:
    """Graphs of one executor, with their payload (what the unit returned when it was captured)."""

    def __init__(self, capture_after: int = 2):
        self.capture_after = capture_after
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._seen: dict[tuple, int] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Forget every graph (their buffers' addresses or shapes changed)."""
        self._graphs.clear()
        self._seen.clear()

    def replay(self, key: tuple):
        """Replay the graph of ``key`` and return (True, its payload); (False, None) if there is none."""
        hit = self._graphs.get(key)
        if hit is None:
            return False, None
        hit[0].replay()
        return True, hit[1]

    def seen(self, key: tuple) -> bool:
        """Count one eager run of ``key``; True when it is time to capture it."""
        n = self._seen.get(key, 0) + 1
        self._seen[key] = n
        return n >= self.capture_after

    def capture(self, key: tuple, unit: Callable[[], object]) -> None:
        """Record ``unit()`` (which must have just run eagerly with the same key) as the graph of ``key``."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            payload = unit()
        self._graphs[key] = (graph, payload)
