"""GraphCache's bookkeeping (which graph it keeps, when it captures), with a recorder that needs no GPU."""

import pytest

from dllm.runtime.graphs import GraphCache


class Recorded:
    """Stands in for a captured CUDA graph: replay runs the unit again."""

    def __init__(self, unit):
        self.unit = unit

    def replay(self):
        self.unit()


class HostCache(GraphCache):
    def _record(self, unit):
        return Recorded(unit), unit()


def _capture(cache, key, log):
    cache.capture(key, lambda: log.append(key) or key)


def test_a_full_cache_drops_the_graph_replayed_longest_ago():
    log = []
    cache = HostCache(max_graphs=2)
    _capture(cache, "a", log)
    _capture(cache, "b", log)
    assert cache.replay("a") == (True, "a")             # "b" is now the one replayed longest ago
    _capture(cache, "c", log)
    assert len(cache) == 2 and cache.dropped == 1
    assert cache.replay("b") == (False, None)
    assert cache.replay("a") == (True, "a") and cache.replay("c") == (True, "c")
    assert log == ["a", "b", "a", "c", "a", "c"]         # each capture ran its unit once, each replay once


def test_a_key_is_captured_the_second_time_it_is_seen_even_after_many_others():
    cache = HostCache(max_graphs=1)
    assert not cache.seen("k") and cache.seen("k")
    for i in range(20):                                  # keys seen once: forgotten, never more than 8 x max
        cache.seen(i)
        assert len(cache._seen) <= 8
    assert not cache.seen("k") and cache.seen("k")


def test_max_graphs_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        GraphCache(max_graphs=0)
