"""Which prompts each step trains on: seeded epochs without replacement, with a resumable cursor."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplerState:
    """Everything needed to continue the prompt stream exactly (saved in checkpoints)."""

    epoch: int
    cursor: int  # position inside this epoch's permutation


class PromptSampler:
    """Yields dataset indices epoch by epoch; each epoch is a fresh seeded permutation.

    The permutation of epoch e depends only on (seed, e), so a cursor is all a resume needs.
    """

    def __init__(self, num_rows: int, seed: int, state: SamplerState | None = None):
        if num_rows <= 0:
            raise ValueError("the prompt set is empty: check data.task / data.path")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = state.epoch if state else 0
        self.cursor = state.cursor if state else 0
        self._perm = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def take(self, n: int) -> list[int]:
        """The next n indices (crossing into the next epoch when this one runs out)."""
        out: list[int] = []
        while len(out) < n:
            if self.cursor >= self.num_rows:
                self.epoch += 1
                self.cursor = 0
                self._perm = self._permutation(self.epoch)
            k = min(n - len(out), self.num_rows - self.cursor)
            out.extend(int(i) for i in self._perm[self.cursor : self.cursor + k])
            self.cursor += k
        return out

    def state(self) -> SamplerState:
        return SamplerState(self.epoch, self.cursor)


def sample_seed(base_seed: int, step: int, prompt_id: str, round_: int = 0) -> int:
    """A stable 31-bit sampler seed for one prompt at one step (independent of worker placement)."""
    return zlib.crc32(f"{base_seed}/{step}/{round_}/{prompt_id}".encode()) & 0x7FFFFFFF
