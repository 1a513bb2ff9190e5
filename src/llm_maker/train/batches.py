"""Pretraining batches: random fixed-length blocks from memory-mapped token shards.

The token stream is cut into non-overlapping blocks of seq_len + 1 tokens (block i starts at
i * seq_len, so targets overlap the next block's first input by one token). Each epoch visits
every block once in a fresh order from a seeded permutation. A micro-batch is a pure function
of its index, so resuming needs only the step count -- and ranks read disjoint slices.

Under torchrun the trainer deals global micro-batch indices to the ranks (rank r of N takes
r, r+N, ... of each step: train/distributed.py), so every rank builds this one-process view
and a step covers the same blocks on any number of ranks. `rank`/`world_size` give a rank's
own interleaved view instead, for a loop that slices the data by itself.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from llm_maker.errors import DataError


class PretrainBatches:
    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, seed: int,
                 val_tokens: Optional[np.ndarray] = None, rank: int = 0, world_size: int = 1,
                 device: Optional[torch.device] = None):
        self.tokens, self.val_tokens = tokens, val_tokens
        self.seq_len, self.batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.n_blocks = (len(tokens) - 1) // seq_len
        if self.n_blocks < micro_batch_size * world_size:
            raise DataError(
                f"the train split has {len(tokens):,} tokens: {self.n_blocks} blocks of seq_len={seq_len}, fewer "
                f"than one micro-batch ({micro_batch_size} x {world_size} ranks); use more data or a smaller "
                f"train.micro_batch_size / model.seq_len")
        self.tokens_per_micro_batch = micro_batch_size * seq_len
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def block_ids(self, index: int) -> np.ndarray:
        """Block ids of micro-batch `index` for this rank: global samples [index*B*W + rank*B, +B)."""
        start = (index * self.world_size + self.rank) * self.batch_size
        ids = np.empty(self.batch_size, dtype=np.int64)
        for j in range(self.batch_size):
            epoch, pos = divmod(start + j, self.n_blocks)
            ids[j] = self._permutation(epoch)[pos]
        return ids

    def epoch_of(self, index: int) -> float:
        return (index + 1) * self.world_size * self.batch_size / self.n_blocks

    def _gather(self, tokens: np.ndarray, block_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([np.asarray(tokens[b * T: b * T + T + 1], dtype=np.int64) for b in block_ids])  # (B, T+1)
        batch = torch.from_numpy(rows)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]  # x (B, T), y (B, T)

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather(self.tokens, self.block_ids(index))

    def val_batches(self, max_batches: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic, in-order, non-overlapping validation blocks."""
        if self.val_tokens is None:
            return
        n = (len(self.val_tokens) - 1) // self.seq_len
        ids = np.arange(n)
        for i, start in enumerate(range(0, n, self.batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self._gather(self.val_tokens, ids[start:start + self.batch_size])
