"""StepView: where the decode loop is, as the policies see it (host-side numbers only)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class StepView:
    """The loop's position, shared with the cache and commit policies. Positions are absolute canvas rows."""
    prompt_len: int
    canvas_len: int
    step: int = 0            # global step counter, 1-based, not reset per block
    step_in_block: int = 0   # 0-based
    block_index: int = 0
    start: int = 0           # first position of the current block
    end: int = 0             # one past its last position
    block_masks: int = 0     # masks left in the current block
    key_pos: int = -1        # rightmost position committed by the most recent committing step (A.5)

    @property
    def gen_len(self) -> int:
        return self.canvas_len - self.prompt_len
