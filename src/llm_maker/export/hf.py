"""Export a model directory as a Hugging Face `LlamaForCausalLM` directory (no remote code).

    OUT/
      config.json              transformers' LlamaConfig: GQA, rope, rms_norm_eps, context, tying
      generation_config.json   bos/eos (the template's stop tokens)/pad ids: only the keys that are set
      model.safetensors        weights under transformers' names (a tied head stored once)
      tokenizer.json           the tokenizer the model was trained with
      tokenizer_config.json    special tokens and the chat template: an imported model's own Jinja
                               (config.json's `jinja_chat_template`), else an SFT model's llm-maker one
      README.md                the model card (export/card.py)

Special ids are the original's where an import kept them (`special_ids`: bos/eos/pad/unk, e.g.
SmolLM2's 1/2/2), else ours: no bos, the template's end token as eos, our pad, no unk.

Weights need no permutation: our attention already rotates split halves (`apply_rope` in
model/llama.py), the layout of transformers' Llama, and module names follow LlamaForCausalLM's, so export is a
rename (`model.` prefix) and the round-trip test checks logits to 1e-4.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from llm_maker.artifacts import atomic_dir, atomic_write_json, atomic_write_text
from llm_maker.errors import LLMMakerError
from llm_maker.export.card import model_card
from llm_maker.layout import WEIGHTS
from llm_maker.model.llama import LlamaConfig
from llm_maker.sft.templates import end_token, hf_tokenizer_config, jinja_chat_template
from llm_maker.tokenizer.tokenizer import EOS, Tokenizer
from llm_maker.train.checkpoint import ModelMeta, load_model_dir, model_state_dict

JINJA_KEY = "jinja_chat_template"  # ModelMeta.extra: an imported model's own chat template, as Jinja text
SPECIAL_IDS_KEY = "special_ids"  # ModelMeta.extra: {"bos", "eos", "pad", "unk"} ids as the original had them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise LLMMakerError("exporting to Hugging Face needs transformers: pip install 'llm-maker[hf]'") from None
    return transformers


def check_export_target(out: Path, force: bool, source: Path) -> None:
    """Refuse, before any work, a target that holds something (unless --force) or that would
    delete the model being exported."""
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise LLMMakerError(f"--out {out} holds the source model ({source}); choose another directory")
    if out.is_file() or out.is_symlink():
        raise LLMMakerError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LLMMakerError(f"--out {out} exists and is not empty; pass --force to replace it")


# --------------------------------------------------------------------------------------
# Pure conversions
# --------------------------------------------------------------------------------------

def hf_weight_name(name: str) -> str:
    """Our state-dict key -> transformers' (everything but the head lives under `model.`)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def hf_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Renamed, contiguous tensors in `dtype`. A tied head is absent from `state` (stored once, as
    the embedding) and stays absent: transformers ties it back when `tie_word_embeddings`."""
    return {hf_weight_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def stop_ids_of(meta: ModelMeta, tokenizer: Tokenizer) -> list[int]:
    """The ids generation stops on: the SFT template's stop tokens, else <|endoftext|>."""
    ids = meta.stop_token_ids or [tokenizer.eos_id]
    return [int(i) for i in ids]


def special_ids_of(meta: ModelMeta, tokenizer: Tokenizer) -> dict[str, Optional[int]]:
    """{"bos", "eos", "pad", "unk"} ids: the original model's (`special_ids`, kept by import), else
    ours. An eos or pad the original lacks stays ours; a bos or unk it lacks stays absent (None)."""
    ids = {"bos": None, "eos": tokenizer.token_id(eos_token_of(meta)), "pad": tokenizer.pad_id, "unk": None}
    given = meta.extra.get(SPECIAL_IDS_KEY) or {}
    for key in ids:
        if key in given and (given[key] is not None or key in ("bos", "unk")):
            ids[key] = None if given[key] is None else int(given[key])
    return ids


def chat_template_of(meta: ModelMeta) -> Optional[str]:
    """The Jinja chat template to export: the model's own (an import's), else its llm-maker
    template's (an SFT model), else None (a base model)."""
    return meta.extra.get(JINJA_KEY) or (jinja_chat_template(meta.chat_template) if meta.chat_template else None)


def hf_config_dict(cfg: LlamaConfig, eos_id: int, pad_id: int, dtype: str = "float32",
                   bos_id: Optional[int] = None) -> dict[str, Any]:
    """config.json, built by transformers' own LlamaConfig so field names match the installed
    version (5.x keeps rope_theta inside rope_parameters). `rope_theta` is repeated at the top
    level for readers that predate rope_parameters (transformers 4.x, llama.cpp's converter)."""
    transformers = require_transformers()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    out = hf_cfg.to_diff_dict()  # without the generic PretrainedConfig defaults (id2label, ...)
    out.update(architectures=["LlamaForCausalLM"], rope_theta=cfg.rope_theta, dtype=dtype, torch_dtype=dtype)
    return out


def generation_config_dict(stop_ids: list[int], pad_id: Optional[int], bos_id: Optional[int] = None) -> dict[str, Any]:
    """generation_config.json: stop on every stop id; greedy (transformers' default, so unwritten).
    Written by hand with only the keys that are set: GenerationConfig.to_dict() adds ~75 nulls."""
    eos: int | list[int] = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    gen = {"bos_token_id": bos_id, "eos_token_id": eos, "pad_token_id": pad_id}
    return {k: v for k, v in gen.items() if v is not None}


def tokenizer_config_of(meta: ModelMeta, tokenizer: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: llm-maker's (sft/templates.py), with the model's own chat template and
    its bos/eos/pad/unk tokens named as `special_ids_of` says."""
    config = hf_tokenizer_config(meta.chat_template, model_max_length)
    template = chat_template_of(meta)
    if template:
        config["chat_template"] = template
    for key, tid in special_ids_of(meta, tokenizer).items():
        token = None if tid is None else tokenizer.hf.id_to_token(tid)
        if token is not None or key == "bos":
            config[f"{key}_token"] = token
    return config


def eos_token_of(meta: ModelMeta) -> str:
    template = meta.chat_template
    return end_token(template) if template else EOS


# --------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------

def export_hf(model_dir: str | Path, out: str | Path, force: bool = False, dtype: str = "float32",
              card: Optional[str] = None) -> Path:
    """Write `out` as a transformers LlamaForCausalLM directory; returns `out`.

    `card` is the README.md text (None: built from the model's run, see export/card.py). The
    directory is built beside `out` and renamed into place, so a failure leaves `out` untouched."""
    model_dir, out = Path(model_dir), Path(out)
    if dtype not in DTYPES:
        raise LLMMakerError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_export_target(out, force, model_dir)
    require_transformers()
    model, tokenizer, meta = load_model_dir(model_dir)
    cfg = model.config
    ids = special_ids_of(meta, tokenizer)
    stop_ids = stop_ids_of(meta, tokenizer)
    if card is None:
        card = model_card(model_dir, model, meta)
    with atomic_dir(out) as tmp:
        save_file(hf_state_dict(model_state_dict(model), DTYPES[dtype]), str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config_dict(cfg, ids["eos"], ids["pad"], dtype, bos_id=ids["bos"]))
        atomic_write_json(tmp / "generation_config.json", generation_config_dict(stop_ids, ids["pad"], ids["bos"]))
        tokenizer.save(tmp)
        atomic_write_json(tmp / "tokenizer_config.json", tokenizer_config_of(meta, tokenizer, cfg.seq_len))
        atomic_write_text(tmp / "README.md", card)
    return out


def export_to_temp(model_dir: str | Path, parent: str | Path) -> Path:
    """Export into a fresh folder under `parent` (for lm-eval); the caller removes `parent`."""
    out = Path(parent) / Path(model_dir).name
    shutil.rmtree(out, ignore_errors=True)
    return export_hf(model_dir, out, force=True, card="")
