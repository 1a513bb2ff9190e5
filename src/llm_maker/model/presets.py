"""Named model shapes of published small models (the README's table lists them)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from llm_maker.model.llama import LlamaConfig

# LlamaConfig's fields are the one list of model dimensions: the recipe's `model:` keys and the
# presets below are read against it, so a field added to the model is a recipe key at once.
MODEL_DIMS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LlamaConfig))
# Dims a recipe may leave out without a preset: n_kv_heads defaults to n_heads (no GQA), the rest
# to LlamaConfig's defaults. Every other dim is the shape itself and must come from somewhere.
DEFAULTED_DIMS = ("n_kv_heads", "tie_embeddings", "rope_theta", "norm_eps")

PRESETS: dict[str, dict[str, Any]] = {
    # The demo: small enough to pretrain on 2 CPU cores in minutes, GQA included.
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_mlp=384, vocab_size=4096,
                 seq_len=256, tie_embeddings=True),
    # models B/C of the LLM Maker design doc: 12,194,048 parameters.
    "12m": dict(n_layers=8, d_model=256, n_heads=4, n_kv_heads=4, d_mlp=960, vocab_size=16384,
                seq_len=1024, tie_embeddings=True),
    # model D of the LLM Maker design doc: 97,536,768 parameters.
    "100m": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_mlp=2048, vocab_size=16384,
                 seq_len=1024, tie_embeddings=True),
    # slm-124M-llama32k-fwedu (LlamaForCausalLM, untied).
    "124m": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_mlp=2048, vocab_size=32000,
                 seq_len=1024, tie_embeddings=False),
    # l20-edu-135m (the SmolLM2-135M shape): 134,515,008 parameters.
    "135m": dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536, vocab_size=49152,
                 seq_len=2048, tie_embeddings=True),
    # ParchmentLM-166M (tiktoken cl100k_base vocabulary).
    "166m": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_mlp=3072, vocab_size=100277,
                 seq_len=1024, tie_embeddings=True),
}
assert all(set(p) <= set(MODEL_DIMS) for p in PRESETS.values()), "a preset names a dim LlamaConfig lacks"


def resolve_model_config(spec: Any, vocab_size: Optional[int] = None) -> LlamaConfig:
    """Preset values, overridden by explicit recipe values; `vocab_size` (the tokenizer's) wins
    over the preset's when the recipe does not set one. Raises ValueError('field: why')."""
    values: dict[str, Any] = {}
    preset = getattr(spec, "preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values.update(PRESETS[preset])
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    for name in MODEL_DIMS:
        v = getattr(spec, name, None)
        if v is not None:
            values[name] = v
    missing = [n for n in MODEL_DIMS if n not in DEFAULTED_DIMS and n not in values]
    if missing:
        raise ValueError(f"{missing[0]}: is required when no preset gives it")
    values.setdefault("n_kv_heads", values["n_heads"])
    cfg = LlamaConfig(**values)
    cfg.validate()
    return cfg
