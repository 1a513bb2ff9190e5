"""A Llama-style decoder in one file: config, RMSNorm, RoPE, GQA attention, SwiGLU, KV cache.

Design (and why), as in seed 004's table:
  RoPE              relative positions; rotates split halves, the Hugging Face Llama layout,
                    so export needs no permutation of q/k weights.
  RMSNorm, pre-norm cheaper than LayerNorm (no mean-centring), stable.
  SwiGLU MLP        gated activation, stronger than a GELU MLP at equal parameters.
  SDPA attention    PyTorch's fused causal kernel (flash / memory-efficient where available).
  GQA               n_kv_heads < n_heads shares keys/values across query groups: a smaller KV cache.
  tied embeddings   the output head reuses the input embedding: saves V*d parameters.

For generation, `KVCache` holds sequences that advance in step; `BatchKVCache` holds independent
sequences, each at its own position, for a server that batches concurrent requests.

Module names follow transformers' LlamaForCausalLM, so a state dict maps 1:1 at export.
Shapes in comments: B batch, T time, C d_model, nh query heads, nkv kv heads, hd head dim.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_maker.train.loss import linear_cross_entropy


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 4
    d_mlp: int = 384
    seq_len: int = 256
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        """Raise ValueError('field: why') for an impossible shape."""
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"d_model: head dim {self.head_dim} (d_model / n_heads) must be even for RoPE")

    def to_dict(self) -> dict:
        return asdict(self)


def count_parameters(cfg: LlamaConfig) -> int:
    """Parameters implied by the dims; asserted against the built model."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d  # q, k, v, o
    mlp = 3 * d * cfg.d_mlp  # gate, up, down
    norms = 2 * d  # input_layernorm, post_attention_layernorm
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * (attn + mlp + norms) + d + embeddings  # + final norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16 autocast, as transformers' Llama does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions: (T, hd), halves repeated (HF layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = torch.outer(positions.float(), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, h, T, hd); rotate the two halves of each head by the position's angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


CacheView = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # keys, values, attention mask (None: SDPA's own)


class KVCache:
    """Preallocated keys/values for generation: (n_layers, B, nkv, max_len, hd) each. Every row
    is at the same position (one prompt, or prompts of equal length)."""

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, device, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # tokens already cached

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
        self.end = 0  # one past the last position of the forward in progress

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

    def begin(self, T: int, device) -> torch.Tensor:
        """Positions (B, T) of the T tokens about to be fed to each selected row; also builds the
        mask every layer will use for them."""
        lengths = self.lengths[self._rows]
        self.end = max(lengths) + T
        if self.end > self.max_len:
            raise ValueError(f"batch KV cache full: {max(lengths)} + {T} tokens > max_len {self.max_len}")
        start = torch.tensor(lengths, dtype=torch.long, device=device)
        self._positions = start[:, None] + torch.arange(T, device=device)  # (B, T)
        keys = torch.arange(self.end, device=device)
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
        return ck[:, :, :self.end], cv[:, :, :self.end], self._mask

    def advance(self, n: int) -> None:
        for i in range(self._rows.start, self._rows.stop):
            self.lengths[i] += n


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: Optional[KVCache | BatchKVCache] = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, k, v)  # (B, nkv, past+T, hd)
        # Without a mask: causal when queries and keys are the same positions; one new token
        # after a cached prefix sees every key.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and k.size(2) == T,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache: Optional[KVCache | BatchKVCache] = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False
        self.loss_chunk_size = 0  # > 0: the training loss goes through the head this many tokens at a time
        cos, sin = rope_cos_sin(torch.arange(cfg.seq_len), cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (T_max, hd)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init for the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def _rope(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if start + T <= self.rope_cos.size(0):
            return self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        positions = torch.arange(start, start + T, device=device)  # beyond the trained context
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

    def _rope_rows(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, 1, T, hd) for per-row positions (B, T), all below `end`; broadcast over heads."""
        if end <= self.rope_cos.size(0):
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        else:  # beyond the trained context
            cos, sin = rope_cos_sin(positions.reshape(-1), self.config.head_dim, self.config.rope_theta)
            cos, sin = cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache | BatchKVCache] = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, V), or the mean loss if `targets`
        (B, T, with -100 for ignored positions) is given. With a `BatchKVCache`, each row
        continues its own sequence at its own position (see that class)."""
        B, T = idx.shape
        if isinstance(cache, BatchKVCache):
            cos, sin = self._rope_rows(cache.begin(T, idx.device), cache.end)
        else:
            cos, sin = self._rope(cache.pos if cache is not None else 0, T, idx.device)
        cos, sin = cos.to(idx.device), sin.to(idx.device)
        x = self.embed_tokens(idx)  # (B, T, C)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if targets is not None and self.loss_chunk_size:  # never the full (B*T, V) logits: see train/loss.py
            return linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                        self.loss_chunk_size)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        # The loss in fp32 whatever the autocast dtype.
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    def weight_decay_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (linear weights, embeddings); not norms' gains."""
        seen, decay, no_decay = set(), [], []
        for _, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token: 6·N (N without the input embedding lookup, with the head
        matmul) + 12·L·d·T for attention scores (PaLM appendix B convention)."""
        cfg = self.config
        T = seq_len or cfg.seq_len
        n_matmul = count_parameters(cfg) - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
        return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.d_model * T
