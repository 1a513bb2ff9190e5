"""KV caches for generation: what `LlamaModel` attends to instead of recomputing the prefix.

    cache = KVCache(model.config, batch_size=1, max_len=96, device=device)
    logits = model(prompt, cache=cache)          # prefill: (1, T, V), keys/values of T positions kept
    logits = model(next_id, cache=cache)         # one token on top of them

`KVCache` holds sequences that advance in step (serve/generate.py); `BatchKVCache` holds
independent sequences, each at its own position, for a server that batches concurrent requests
(serve/batching.py). Both follow the model's `Cache` protocol: `positions(T)` before the layers,
`update(layer, k, v)` in each attention, `advance(T)` after.
"""
from __future__ import annotations

from typing import Optional

import torch

from llm_maker.model.llama import CacheView, LlamaConfig


class KVCache:
    """Preallocated keys/values for generation: (n_layers, B, nkv, max_len, hd) each. Every row
    is at the same position (one prompt, or prompts of equal length)."""

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # tokens already cached

    def positions(self, T: int) -> torch.Tensor:
        return torch.arange(self.pos, self.pos + T, device=self.k.device)[None]  # (1, T): every row alike

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """Store k, v (B, nkv, T, hd) at the current position; return all cached keys/values and
        the attention mask, None where SDPA's own causal / full view is right."""
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        mask = None
        if self.pos and T > 1:  # a chunk after a cached prefix: causal within the chunk, full view of the prefix
            mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=self.pos)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


class BatchKVCache:
    """Keys/values for continuous batching: up to `max_rows` independent sequences, each at its
    own position, (n_layers, max_rows, nkv, max_len, hd) each.

    Rows 0..n-1 are in use (`add_row` takes row n; `remove_row(i)` moves the last row into i),
    so a decode step over every row attends to a plain slice of the buffers, never a gather.
    Before each forward, `select(rows)` names the rows it feeds: `slice(0, n)` for a decode step
    (one token per row), one row for that row's prefill. A row sees only its own keys: the mask
    hides positions past its length, where an earlier, longer sequence may have left keys."""

    def __init__(self, cfg: LlamaConfig, max_rows: int, max_len: int, device, dtype=torch.float32):
        shape = (cfg.n_layers, max_rows, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_rows, self.max_len = max_rows, max_len
        self.lengths: list[int] = []  # tokens cached per row in use (a host list: no device sync to read)
        self._rows = slice(0, 0)
        self._positions: Optional[torch.Tensor] = None  # (B, T) of the forward in progress
        self._mask: Optional[torch.Tensor] = None  # (B, 1, T, end)
        self._end = 0  # one past the last position of the forward in progress

    @property
    def n(self) -> int:
        return len(self.lengths)

    def add_row(self) -> int:
        if self.n == self.max_rows:
            raise ValueError(f"batch KV cache full: all {self.max_rows} rows are in use")
        self.lengths.append(0)
        return self.n - 1

    def remove_row(self, i: int) -> None:
        """Free row i; the last row moves into it (callers reorder their own rows the same way)."""
        last = self.n - 1
        if i != last:
            length = self.lengths[last]
            self.k[:, i, :, :length] = self.k[:, last, :, :length]
            self.v[:, i, :, :length] = self.v[:, last, :, :length]
            self.lengths[i] = length
        self.lengths.pop()

    def select(self, rows: slice) -> None:
        if not 0 <= rows.start < rows.stop <= self.n:
            raise ValueError(f"rows {rows.start}:{rows.stop} are not all in use (0:{self.n})")
        self._rows = rows

    def positions(self, T: int) -> torch.Tensor:
        """Positions (B, T) of the T tokens about to be fed to each selected row; also builds the
        mask every layer will use for them."""
        device = self.k.device
        lengths = self.lengths[self._rows]
        self._end = max(lengths) + T
        if self._end > self.max_len:
            raise ValueError(f"batch KV cache full: {max(lengths)} + {T} tokens > max_len {self.max_len}")
        start = torch.tensor(lengths, dtype=torch.long, device=device)
        self._positions = start[:, None] + torch.arange(T, device=device)  # (B, T)
        keys = torch.arange(self._end, device=device)
        self._mask = (keys[None, None, :] <= self._positions[:, :, None]).unsqueeze(1)  # (B, 1, T, end)
        return self._positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """Store k, v (B, nkv, T, hd) at each selected row's own position; return those rows' cached
        keys/values up to the longest of them, and the mask."""
        rows, T = self._rows, k.size(2)
        ck, cv = self.k[layer, rows], self.v[layer, rows]  # views: (B, nkv, max_len, hd)
        if T == 1:  # a decode step: one position per row, written in one indexed copy
            b = torch.arange(k.size(0), device=k.device)
            ck[b, :, self._positions[:, 0]] = k[:, :, 0]
            cv[b, :, self._positions[:, 0]] = v[:, :, 0]
        else:
            for b, start in enumerate(self.lengths[rows]):
                ck[b, :, start:start + T] = k[b]
                cv[b, :, start:start + T] = v[b]
        return ck[:, :, :self._end], cv[:, :, :self._end], self._mask

    def advance(self, n: int) -> None:
        for i in range(self._rows.start, self._rows.stop):
            self.lengths[i] += n
