"""`llm-maker export RUN_DIR --format gguf --out FILE.gguf`: one file llama.cpp (and Ollama,
LM Studio, llama-cpp-python) can run, written with the `gguf` package under llama.cpp's `llama`
architecture: its tensor names (gguf's own TensorNameMap), hyperparameters, the byte-level BPE
vocabulary with merges and token types, special token ids and the chat template.

What the model is travels with it: the bos/eos/pad/unk ids an import kept (`special_ids`, else
ours: <|endoftext|> as bos, never added; the template's end token as eos; our pad), the model's own
Jinja template (else its llm-maker template as Jinja), and for a model that came from a GGUF its
pre-tokenizer name (`gguf_pre`; `--gguf-pre` overrides), so a GGUF imported and exported again
reads as the original.

Weights: f16 (default) or f32 for matrices; norms stay f32, as llama.cpp expects.

RoPE layout. llama.cpp's `llama` architecture rotates *adjacent* pairs of each head,
(x0, x1), (x2, x3), ... (the layout of Meta's original checkpoints), while we, like
transformers, rotate the split halves (x_i, x_{i+hd/2}). transformers' conversion script
permuted Meta's q/k rows from interleaved into halves; llama.cpp's convert_hf_to_gguf undoes it
with `permute` below, and so must we: within each head, row i of the first half goes to 2i and
row i of the second half to 2i+1. Only q_proj and k_proj (the rotated projections) move; since
q and k move alike, every attention score q·k is unchanged (tests/test_gguf.py checks this
numerically against an interleaved RoPE).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from llm_maker.artifacts import atomic_path
from llm_maker.errors import LLMMakerError
from llm_maker.export.hf import SPECIAL_IDS_KEY, chat_template_of, hf_weight_name, special_ids_of, stop_ids_of
from llm_maker.model.llama import LlamaConfig
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import ModelMeta, load_model_dir, model_state_dict

GGUF_DTYPES = ("f16", "f32")
GGUF_PRE_KEY = "gguf_pre"  # ModelMeta.extra: the tokenizer.ggml.pre of the GGUF a model was imported from


def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads*hd, d) q/k rows from split-halves to interleaved-pairs order (llama.cpp's
    convert_hf_to_gguf `LlamaModel.permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: LlamaConfig, dtype: str) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> array, q/k permuted, matrices in `dtype`, norms in f32."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    out = {}
    for key, w in state.items():
        w = w.detach().float()
        if key.endswith("self_attn.q_proj.weight"):
            w = permute_for_llama_cpp(w, cfg.n_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            w = permute_for_llama_cpp(w, cfg.n_kv_heads)
        name = names.get_name(hf_weight_name(key), try_suffixes=(".weight",))
        if name is None:
            raise LLMMakerError(f"no llama.cpp tensor name for {key}")
        arr = w.numpy()
        out[name] = arr.astype(np.float16) if dtype == "f16" and arr.ndim == 2 else arr.astype(np.float32)
    return out


def pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's name for our pre-tokenizer: GPT-2's regex (a ByteLevel pre-tokenizer that
    splits with its regex) is `gpt-2`; others need naming by hand (`pre=`)."""
    pre = json.loads(tokenizer.hf.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    raise LLMMakerError(f"{tokenizer.source}: pre-tokenizer {pre.get('type')!r} has no known llama.cpp name; "
                        "pass the llama.cpp pre-tokenizer name (e.g. --gguf-pre dbrx for cl100k_base)")


def vocab_for_gguf(tokenizer: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b"), padded to the model's n_vocab with unused
    [PAD{i}] entries as llama.cpp's converter pads."""
    import gguf

    raw = json.loads(tokenizer.hf.to_str())
    by_id: dict[int, str] = {i: t for t, i in raw["model"]["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in raw.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise LLMMakerError(f"{tokenizer.source}: token id {max(by_id)} does not fit the model's vocab {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(kinds.get(i, gguf.TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"].get("merges", [])]
    return tokens, types, merges


def write_gguf(path: Path, tensors: dict[str, np.ndarray], cfg: LlamaConfig, tokenizer: Tokenizer, meta: ModelMeta,
               chat_template: Optional[str], name: str, dtype: str, pre: Optional[str]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name)
    w.add_context_length(cfg.seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_mlp)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    tokens, types, merges = vocab_for_gguf(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre or meta.extra.get(GGUF_PRE_KEY) or pre_tokenizer_name(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = special_ids_of(meta, tokenizer)
    if SPECIAL_IDS_KEY not in meta.extra:  # ours: documents are separated by <|endoftext|>; never added (below)
        ids["bos"] = tokenizer.eos_id
    if ids["bos"] is not None:
        w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_pad_token_id(ids["pad"])
    if ids["unk"] is not None:
        w.add_unk_token_id(ids["unk"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    stop = stop_ids_of(meta, tokenizer)
    if len(stop) > 1:  # e.g. <|im_end|> and <|endoftext|>: the turn end is the end-of-turn token
        w.add_eot_token_id(stop[0])
    if chat_template:
        w.add_chat_template(chat_template)
    for tensor_name, arr in tensors.items():
        w.add_tensor(tensor_name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(model_dir: str | Path, out: str | Path, force: bool = False, dtype: str = "f16",
                pre: Optional[str] = None) -> Path:
    """Write `out` (a .gguf file) for the model in `model_dir`; returns `out`."""
    model_dir, out = Path(model_dir), Path(out)
    if dtype not in GGUF_DTYPES:
        raise LLMMakerError(f"--dtype for gguf must be one of {GGUF_DTYPES}, got {dtype!r}")
    if out.is_dir():
        raise LLMMakerError(f"--out {out} is a directory; give a .gguf file path")
    if out.exists() and not force:
        raise LLMMakerError(f"--out {out} exists; pass --force to replace it")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LLMMakerError("GGUF export needs the gguf package: pip install 'llm-maker[hf]'") from None
    model, tokenizer, meta = load_model_dir(model_dir)
    cfg = model.config
    tensors = gguf_tensors(model_state_dict(model), cfg, dtype)
    chat_template = chat_template_of(meta)
    name = meta.recipe or model_dir.name
    with atomic_path(out) as tmp:
        write_gguf(tmp, tensors, cfg, tokenizer, meta, chat_template, f"{name}-{meta.stage or 'model'}", dtype, pre)
    return out
