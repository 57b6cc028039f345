"""CUDA graphs keyed by what fixes their work: captured the second time a key is seen, then replayed.

The executor captures two kinds of units (runtime/executor.py): a whole step (embedding, every layer,
the head and, where the commit policy allows, its commit decision) and, for steps whose shape does not
repeat, single layers. A key holds every host-side value the unit's kernels depend on (row counts,
flags, block bounds); everything else the kernels read lives in persistent device buffers.

Capture only records kernels: the unit has just run eagerly for the same key, so its kernels are
compiled and its lazily made buffers exist. All graphs share one memory pool; they replay one at a
time on one stream.

A long run can meet ever new keys (a server's batches mix every new request's canvas length into them),
so a cache holds at most ``max_graphs`` graphs and drops the one replayed longest ago to capture another;
a dropped key is captured again if it comes back.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Callable

import torch


class GraphCache:
    """Graphs of one executor, with their payload (what the unit returned when it was captured)."""

    def __init__(self, capture_after: int = 2, max_graphs: int = 2048, device: torch.device | None = None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.capture_after, self.max_graphs = capture_after, max_graphs
        self.device = device              # the GPU the units run on (cuda:1 need not be the thread's current one)
        # least recently replayed first
        self._graphs: collections.OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, object]] = collections.OrderedDict()
        self._seen: dict[tuple, int] = {}
        self._pool = None
        self.dropped = 0

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
        self._graphs.move_to_end(key)
        with self._on_device():
            hit[0].replay()
        return True, hit[1]

    def seen(self, key: tuple) -> bool:
        """Count one eager run of ``key``; True when it is time to capture it."""
        if key not in self._seen and len(self._seen) >= 8 * self.max_graphs:
            self._seen.clear()              # keys seen once and never again: forget them, not the graphs
        n = self._seen.get(key, 0) + 1
        self._seen[key] = n
        return n >= self.capture_after

    def capture(self, key: tuple, unit: Callable[[], object]) -> None:
        """Record ``unit()`` (which must have just run eagerly with the same key) as the graph of ``key``,
        dropping the graph replayed longest ago when the cache is full."""
        graph, payload = self._record(unit)
        self._graphs[key] = (graph, payload)
        self._graphs.move_to_end(key)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.dropped += 1

    def _record(self, unit: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
        with self._on_device():
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                payload = unit()
        return graph, payload

    def _on_device(self):
        """The units' GPU as the current device while capturing or replaying (a capture records the current
        device's stream); nothing to do for plain "cuda" or when it already is."""
        index = None if self.device is None else self.device.index
        if index is None or torch.cuda.current_device() == index:
            return contextlib.nullcontext()
        return torch.cuda.device(index)
