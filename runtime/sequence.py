"""One sequence's way through its blocks and steps: the per-sequence half of the decode loop.

A ``SequenceRun`` owns what decides a sequence's steps: its StepView, its cache and commit policies,
its random generator and its record (commit step of every position, rows, timing). The loop asks it
for its next step (``next_step``: the commit policy's logit range, or None when every block is done),
runs one executor step for every sequence of the batch at once, and hands each its committed positions
(``finish_step``). A sequence in a batch therefore takes exactly the steps it takes alone, whatever
the others do: blocks end when its own block is empty, its DCU window follows its own tokens.

Positions are canvas rows. A sequence of a batch sits at the start of its row of the batch's canvas,
``[prompt, generation, padding]``: its rows are where they are when it decodes alone, so its policies
see its own prompt and canvas lengths and need no notion of the batch.
"""

from __future__ import annotations

import time

import torch

from dllm.runtime.cache_policy import CachePolicy
from dllm.runtime.commit import CommitPolicy
from dllm.runtime.config import DecodeConfig
from dllm.runtime.view import StepView


class SequenceRun:
    """The decoding state of one prompt (``prompt`` [1, P]) in slot ``slot`` of a batch."""

    def __init__(self, index: int, prompt: torch.Tensor, cfg: DecodeConfig, cache: CachePolicy,
                 commit: CommitPolicy, slot: int = 0):
        self.index, self.prompt, self.cfg, self.slot = index, prompt, cfg, slot
        self.cache, self.commit = cache, commit
        self.P, self.G = prompt.shape[1], cfg.gen_length
        self.N = self.P + self.G                     # this sequence's canvas: the rows it occupies
        self.view = StepView(prompt_len=self.P, canvas_len=self.N, key_pos=self.P - 1)
        self.commit_step = [-1] * self.G
        self.rows_per_step: list[list[int]] = []
        self.tokens_per_step: list[int] = []
        self.step_end_s: list[float] = []
        self.engine_s = 0.0
        self._block = -1
        self._i = 0                # the next step's index in its block
        self._steps_left = 0       # steps its block may still take
        self.done = False

    def start(self, n_layers: int, vocab: int, device: torch.device) -> None:
        """Reset the policies for this sequence (its own seeded generator) and start the clock."""
        generator = torch.Generator(device=device).manual_seed(self.cfg.seed)
        self.cache.reset(n_layers, self.P, self.G, device)
        self.commit.reset(1, self.P, self.G, vocab, device, generator)
        self.t_start = time.perf_counter()

    def next_step(self) -> tuple[int, int] | None:
        """Advance to this sequence's next step (into the next block when its block is done) and return
        the canvas rows [lo, hi) whose logits the commit needs; None once every block is done."""
        view, commit = self.view, self.commit
        while self._block_done():
            self._block += 1
            if self._block >= self.cfg.num_blocks:
                self.done = True
                return None
            bl = self.cfg.block_length
            view.block_index, view.start, view.end = self._block, self.P + self._block * bl, self.P + (self._block + 1) * bl
            view.block_masks, view.step_in_block = bl, 0
            commit.begin_block(view)
            self._steps_left, self._i = commit.block_steps(view), 0
        self._steps_left -= 1
        view.step_in_block, self._i = self._i, self._i + 1
        view.step += 1
        self.cache.begin_step(view)
        return commit.logit_range(view)

    @property
    def finished(self) -> bool:
        """Its last block is done: ``next_step`` will return None. Known right after the step that committed
        the last token, so a batch can count the slot as free before the next step. (False where a later
        block would take no step at all; ``next_step`` still finds the end then.)"""
        return self._block_done() and self._block + 1 >= self.cfg.num_blocks

    def _block_done(self) -> bool:
        """The current block takes no more steps: its step budget is spent, or it is empty and the commit
        policy stops at empty blocks."""
        return self._steps_left <= 0 or (self.commit.until_empty and self.view.block_masks == 0)

    def finish_step(self, committed: list[int], rows: list[int], engine_s: float) -> None:
        """Record the positions this step committed (ascending canvas rows) and what the step cost."""
        view = self.view
        for pos in committed:
            self.commit_step[pos - self.P] = view.step - 1
        view.block_masks -= len(committed)
        if committed:
            view.key_pos = committed[-1]
        self.rows_per_step.append(rows)
        self.tokens_per_step.append(len(committed))
        self.engine_s += engine_s
        self.step_end_s.append(time.perf_counter() - self.t_start)
