"""Method names used by bench and eval, mapped onto DecodeConfig.

A method name is ``CACHE`` or ``CACHE+COMMIT``:

| cache part      | cache policy                                                    |
|-----------------|-----------------------------------------------------------------|
| `full`          | every row of every layer (the reference)                        |
| `prefix`        | Fast-dLLM prefix cache                                          |
| `dual`          | Fast-dLLM dual cache                                            |
| `dllm-cache`    | dLLM-Cache (refresh intervals + value-similarity partial update)|
| `dcu`           | Dynamic Cache Update with the config's proxy/allocation/budget  |
| `dcu-reference` | DCU as released: value proxy, uniform budget, intervals 5000/5000|
| `fastdllm-dream-prefix`, `fastdllm-dream-dual` | Fast-dLLM's Dream port (Dream only): prefix or dual cache with `fastdllm_dream` on |

| commit part | commit policy                                  |
|-------------|------------------------------------------------|
| (none)      | `schedule` (so `full` is the reference decoding)|
| `schedule`  | LLaDA fixed count per step                     |
| `threshold` | Fast-dLLM threshold (`base.threshold`)         |
| `factor`    | Fast-dLLM factor (`base.factor`)               |
| `apd`       | Adaptive Parallel Decoding (`base.apd_mode`...) |

Examples: ``full`` (= full+schedule), ``dual+threshold``, ``dcu+apd``,
``full+apd``, ``dcu+factor``, ``fastdllm-dream-dual+threshold``. Underscores and hyphens are
interchangeable.
"""

from __future__ import annotations

from dllm.errors import ConfigError
from dllm.runtime.config import CachePolicyKind, CommitPolicyKind, DecodeConfig

CACHE_NAMES = ("full", "prefix", "dual", "dllm-cache", "dcu", "dcu-reference", "fastdllm-dream-prefix",
               "fastdllm-dream-dual")
# presets that reproduce a public implementation: cache name -> the DecodeConfig fields they fix
PRESETS = {
    # Dynamic-dLLM's released DCU, spelled out so results and reports show them
    "dcu-reference": dict(proxy="value", allocation="uniform", prompt_interval=5000, gen_interval=5000,
                          refresh_interval=None),
    # Fast-dLLM's Dream port: its cache loop's first-position commit, entropy-ranked schedule and threshold mode
    "fastdllm-dream-prefix": dict(cache="prefix", fastdllm_dream=True),
    "fastdllm-dream-dual": dict(cache="dual", fastdllm_dream=True),
}
COMMIT_NAMES = ("schedule", "threshold", "factor", "apd")


def method_config(name: str, base: DecodeConfig | None = None) -> DecodeConfig:
    """``base`` with the cache (and optional commit) policy of method ``name`` applied."""
    base = base or DecodeConfig()
    parts = [p.strip().lower().replace("_", "-") for p in str(name).split("+")]
    if len(parts) > 2 or not parts[0]:
        raise ConfigError(f"method {name!r} is not CACHE or CACHE+COMMIT; caches: {', '.join(CACHE_NAMES)}; "
                          f"commits: {', '.join(COMMIT_NAMES)} (e.g. 'dcu+apd')")
    cache = parts[0]
    if cache not in CACHE_NAMES:
        raise ConfigError(f"method {name!r}: unknown cache policy {cache!r}; expected one of {', '.join(CACHE_NAMES)}")
    commit = parts[1] if len(parts) == 2 else "schedule"
    if commit not in COMMIT_NAMES:
        raise ConfigError(f"method {name!r}: unknown commit policy {commit!r}; expected one of "
                          f"{', '.join(COMMIT_NAMES)}")
    changes: dict = {"commit": CommitPolicyKind(commit), "fastdllm_dream": False}
    if cache in PRESETS and "cache" in PRESETS[cache]:
        changes.update(PRESETS[cache])
    else:
        changes["cache"] = CachePolicyKind(cache)
        changes.update(PRESETS.get(cache, {}))
    return base.replace(**changes)
