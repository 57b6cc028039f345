"""Token draws of the commit policies, in the reference decoders' order, shapes and dtypes.

Two families (docs/algorithms.md):
- LLaDA: Gumbel-max, ``argmax(exp(logits) / (-log U)^T)``. LLaDA's reference and Fast-dLLM draw U in
  float64 over the whole canvas ``[B, N, V]``; Dynamic-dLLM's APD draws it in the logits' dtype.
- Dream: ``softmax(logits / T)`` restricted by top-p then top-k, one categorical draw per masked row
  (rows in canvas order), and the drawn token's probability as its confidence.

``top_p``/``top_k`` restrict which tokens can be drawn. LLaDA-style policies take their confidence
from the unrestricted distribution; Dream's own ``sample_tokens`` ranks by the restricted one (so its
top-k changes the ranking even at temperature 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop the tail beyond cumulative mass ``top_p`` (the most likely token always stays): [.., V]."""
    sorted_logits, order = torch.sort(logits, descending=True)
    mass = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop_sorted = mass > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()      # keep the token that crosses top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (ties with the k-th stay): [.., V]."""
    k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def restrict(logits: torch.Tensor, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Top-p, then top-k (Dream's order); None switches a filter off."""
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    return logits


def gumbel_argmax(logits: torch.Tensor, temperature: float, gen: torch.Generator, *,
                  canvas: tuple[int, int] | None = None, noise_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """LLaDA's Gumbel-max token x0 [B, R] of logits [B, R, V] (plain argmax at temperature 0).

    canvas=(N, lo): the logits are canvas rows [lo, lo+R); the noise is drawn for all N rows, as the
    reference decoders do, and our rows are cut out of it. Without it the noise has the logits' shape.
    """
    if temperature == 0:
        return logits.argmax(-1)
    B, R, V = logits.shape
    shape, rows = (B, R, V), slice(None)
    if canvas is not None:
        N, lo = canvas
        shape, rows = (B, N, V), slice(lo, lo + R)
    noise = torch.rand(shape, dtype=noise_dtype, device=logits.device, generator=gen)[:, rows]
    return (logits.to(noise_dtype).exp() / (-torch.log(noise)) ** temperature).argmax(-1)


def dream_probs(logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None) -> torch.Tensor:
    """Dream's sampling distribution of rows [M, V]: softmax(restrict(logits / T)) in the logits' dtype."""
    if temperature > 0:
        logits = logits / temperature
    return torch.softmax(restrict(logits, top_p, top_k), dim=-1)


def dream_draw(probs: torch.Tensor, temperature: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [M], token [M]) of Dream's distribution rows [M, V]: a draw at temperature > 0, else the max."""
    if temperature > 0 and probs.shape[0] > 0:
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        return probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1), tok
    return probs.max(dim=-1)
