"""A Llama-style decoder in one file: config, RMSNorm, RoPE, GQA attention, SwiGLU, parameter count.

Design (and why), as in the LLM Maker design doc's table:
  RoPE              relative positions; rotates split halves, the Hugging Face Llama layout,
                    so export needs no permutation of q/k weights.
  RMSNorm, pre-norm cheaper than LayerNorm (no mean-centring), stable.
  SwiGLU MLP        gated activation, stronger than a GELU MLP at equal parameters.
  SDPA attention    PyTorch's fused causal kernel (flash / memory-efficient where available).
  GQA               n_kv_heads < n_heads shares keys/values across query groups: a smaller KV cache.
  tied embeddings   the output head reuses the input embedding: saves V*d parameters.

The model computes logits and nothing else: the loss is the trainer's (train/loss.py), and the
KV caches that generation feeds it live beside generation (serve/kv_cache.py), behind `Cache`.

Module names follow transformers' LlamaForCausalLM, so a state dict maps 1:1 at export.
Shapes in comments: B batch, T time, C d_model, nh query heads, nkv kv heads, hd head dim.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class Cache(Protocol):
    """What the model asks of a KV cache during generation (serve/kv_cache.py holds two): where
    the new tokens sit, somewhere to put their keys/values, and a step forward once all layers ran."""

    max_len: int  # every position stays below this

    def positions(self, T: int) -> torch.Tensor:
        """Position ids (B or 1, T) of the T tokens about to be fed."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """Store this layer's k, v (B, nkv, T, hd); return the keys/values to attend to and the mask."""
        ...

    def advance(self, T: int) -> None:
        """The T tokens are cached in every layer."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: Optional[Cache] = None):
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

    def forward(self, x, cos, sin, cache: Optional[Cache] = None):
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
        self.set_rope(cfg.rope_theta, cfg.seq_len)
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

    def set_rope(self, theta: float, max_len: int) -> None:
        """Rotary tables for positions 0..max_len-1 at base `theta`. Built at the trained values;
        serving on a stretched context (serve/rope_scaling.py) sets others, and `config` keeps the
        trained ones."""
        positions = torch.arange(max_len, device=self.embed_tokens.weight.device)  # where the weights are
        cos, sin = rope_cos_sin(positions, self.config.head_dim, theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_len, hd)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.rope_theta = theta

    @property
    def context_len(self) -> int:
        """The longest sequence to generate: the trained `seq_len`, or the stretched one after `set_rope`."""
        return self.rope_cos.size(0)

    def _rope(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B or 1, 1, T, hd) for position ids (B or 1, T), all below `end`; broadcast over heads."""
        if end <= self.context_len:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        else:  # beyond the tables
            cos, sin = rope_cos_sin(positions.reshape(-1), self.config.head_dim, self.rope_theta)
            cos, sin = cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def hidden_states(self, idx: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns the final-normed hidden states (B, T, C), before the head.
        With a `cache`, the tokens continue the cached sequences at the cache's positions."""
        T = idx.size(1)
        if cache is None:
            cos, sin = self._rope(torch.arange(T, device=idx.device)[None], T)
        else:
            cos, sin = self._rope(cache.positions(T), cache.max_len)
        x = self.embed_tokens(idx)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, V); the loss is the trainer's (train/loss.py)."""
        return self.lm_head(self.hidden_states(idx, cache))

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
