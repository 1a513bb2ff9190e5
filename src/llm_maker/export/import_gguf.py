"""`llm-maker import-gguf FILE.gguf --out RUN_DIR`: a llama.cpp `llama` GGUF (any type the `gguf`
package dequantizes: F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants, ...) becomes an llm-maker
run, laid out as import-hf lays it out:

    RUN_DIR/tokenizer/       the GGUF's own tokenizer (transformers' GGUF builder, from the
                             metadata), padding with the model's pad (tokenizer.ggml.padding_token_id)
    RUN_DIR/pretrain/final/  the weights, dequantized to fp32, and pretrain/manifest.json

Shape and hyperparameters come from the `llama.*` metadata; the head is tied when the file has no
output.weight. q/k rows are moved back from llama.cpp's interleaved-pairs RoPE layout to our
split halves (the inverse of gguf_export.permute_for_llama_cpp). The chat template
(tokenizer.chat_template) is kept as Jinja text in config.json's `jinja_chat_template`, and
`chat_template` names our template (chatml, parchment) when it renders turns as that one does;
the end-of-turn and end-of-text ids become the stop tokens. The file's bos/eos/pad/unk ids are
kept in `special_ids` and its pre-tokenizer name (tokenizer.ggml.pre) in `gguf_pre`, so exports
(export/hf.py, export/gguf_export.py) name them as the original does.

Refused before anything is written, naming the file and the field: another architecture, a tensor
type the gguf package cannot dequantize, a file without a tokenizer, rope scaling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from llm_maker.artifacts import fingerprint
from llm_maker.errors import LLMMakerError, RecipeError
from llm_maker.export.gguf_export import GGUF_PRE_KEY
from llm_maker.export.hf import JINJA_KEY, SPECIAL_IDS_KEY, check_export_target, hf_weight_name
from llm_maker.export.import_hf import grow_vocab, id_space, write_imported_run
from llm_maker.model.llama import LlamaConfig, LlamaModel
from llm_maker.recipe import PACKAGE_PATH_PREFIX, package_file
from llm_maker.sft.templates import template_name_of
from llm_maker.tokenizer.pretrained import load_pretrained_tokenizer
from llm_maker.tokenizer.tokenizer import PAD, Tokenizer
from llm_maker.train.checkpoint import ModelMeta

ARCHITECTURE = "llama"
_MISSING = object()


def unpermute_from_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads*hd, d) q/k rows from llama.cpp's interleaved pairs back to split halves: the
    inverse of permute_for_llama_cpp (transformers' GGUF loader's `reverse_permute`)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------

def open_gguf(path: Path) -> Any:
    """gguf.GGUFReader over `path` (memory-mapped: tensors are read only when dequantized)."""
    try:
        import gguf
    except ImportError:
        raise LLMMakerError("import-gguf needs the gguf package: pip install 'llm-maker[hf]'") from None
    if not path.is_file():
        raise LLMMakerError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/... on a file that is not GGUF
        raise LLMMakerError(f"{path}: not a readable GGUF file: {e}") from None


def gguf_field(reader: Any, key: str, path: Path, default: Any = _MISSING) -> Any:
    """The value of metadata `key`, or LLMMakerError naming the file and the key."""
    if key not in reader.fields:
        if default is _MISSING:
            raise LLMMakerError(f"{path}: metadata `{key}` is missing")
        return default
    return reader.fields[key].contents()


def f32_decimal(x: float) -> float:
    """The shortest decimal a float32 field holds (1e-5, not 9.999999747e-06): GGUF stores
    rope_theta and the norm epsilon as float32, rounded from such a decimal."""
    return float(str(np.float32(x)))


def llama_config_from_gguf(reader: Any, path: Path) -> LlamaConfig:
    """Our LlamaConfig from a GGUF's `llama.*` metadata and tensor shapes."""
    arch = gguf_field(reader, "general.architecture", path)
    if arch != ARCHITECTURE:
        raise LLMMakerError(f"{path}: `general.architecture` is {arch!r}; import-gguf takes {ARCHITECTURE!r} models")
    rope_type = gguf_field(reader, "llama.rope.scaling.type", path, "none")
    if rope_type not in ("none", "", None):
        raise LLMMakerError(f"{path}: `llama.rope.scaling.type` is {rope_type!r}; only plain RoPE is supported")

    def get(name: str, default: Any = _MISSING) -> Any:
        return gguf_field(reader, f"llama.{name}", path, default)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LLMMakerError(f"{path}: tensor `token_embd.weight` is missing")
    d, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = int(tensors["token_embd.weight"].shape[1])  # GGUF shapes are (cols, rows): (d, vocab)
    cfg = LlamaConfig(vocab_size=vocab, n_layers=int(get("block_count")), d_model=d, n_heads=heads,
                      n_kv_heads=int(get("attention.head_count_kv", heads)), d_mlp=int(get("feed_forward_length")),
                      seq_len=int(get("context_length", 2048)), tie_embeddings="output.weight" not in tensors,
                      rope_theta=f32_decimal(get("rope.freq_base", 10000.0)),
                      norm_eps=f32_decimal(get("attention.layer_norm_rms_epsilon", 1e-5)))
    rope_dims = int(get("rope.dimension_count", cfg.head_dim))
    if rope_dims != cfg.head_dim:
        raise LLMMakerError(f"{path}: `llama.rope.dimension_count` {rope_dims} != head dim {cfg.head_dim}; "
                            "only full-head RoPE is supported")
    try:
        cfg.validate()
    except ValueError as e:
        raise LLMMakerError(f"{path}: {e}") from None
    return cfg


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

def check_dequantizable(reader: Any, path: Path) -> None:
    """Every tensor's type is one gguf.quants can dequantize: each type is tried on one zero block
    before any tensor is read, so a refusal costs no dequantization."""
    import gguf
    from gguf.quants import dequantize

    for qtype in dict.fromkeys(t.tensor_type for t in reader.tensors):
        try:
            dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        except NotImplementedError:
            name = next(t.name for t in reader.tensors if t.tensor_type == qtype)
            raise LLMMakerError(f"{path}: tensor `{name}` has type {qtype.name}, which the gguf package "
                                "cannot dequantize") from None


def gguf_names(cfg: LlamaConfig) -> dict[str, str]:
    """llama.cpp tensor name -> our state-dict key (the inverse of the export's naming)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    with torch.device("meta"):  # shapes only, no memory
        keys = list(LlamaModel(cfg).state_dict())
    out = {}
    for key in keys:
        if cfg.tie_embeddings and key == "lm_head.weight":
            continue
        out[names.get_name(hf_weight_name(key), try_suffixes=(".weight",))] = key
    return out


def our_state_dict_from_gguf(reader: Any, cfg: LlamaConfig, path: Path) -> dict[str, torch.Tensor]:
    """Our names -> fp32 tensors: dequantized, shaped (rows, cols), q/k un-permuted."""
    from gguf.quants import dequantize

    check_dequantizable(reader, path)
    names = gguf_names(cfg)
    tensors = {t.name: t for t in reader.tensors}
    missing, unexpected = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise LLMMakerError(f"{path}: tensors do not match a llama of this shape "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    sd = {}
    for name, key in names.items():
        t = tensors[name]
        shape = tuple(reversed([int(n) for n in t.shape]))  # GGUF lists dims innermost first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        if key.endswith("self_attn.q_proj.weight"):
            w = unpermute_from_llama_cpp(w, cfg.n_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            w = unpermute_from_llama_cpp(w, cfg.n_kv_heads)
        sd[key] = w.contiguous()
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd


# --------------------------------------------------------------------------------------
# Tokenizer, stop tokens, chat template
# --------------------------------------------------------------------------------------

def gguf_tokenizer(reader: Any, path: Path) -> Tokenizer:
    """The GGUF's tokenizer, padding with the model's own pad token where it names one."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise LLMMakerError(f"{path}: metadata `tokenizer.ggml.tokens` is missing; the file has no tokenizer")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    pad_id = gguf_field(reader, "tokenizer.ggml.padding_token_id", path, None)
    pad = None
    if pad_id is not None:
        if not 0 <= int(pad_id) < len(tokens.data):
            raise LLMMakerError(f"{path}: `tokenizer.ggml.padding_token_id` {pad_id} is not a token id")
        pad = tokens.contents(int(pad_id))
    try:  # <|pad|> itself is llm-maker's default pad: named, it would change the saved file's hash
        return load_pretrained_tokenizer(path, pad_token=None if pad == PAD else pad)
    except RecipeError as e:
        raise LLMMakerError(str(e).removeprefix("tokenizer.path: ")) from None


def stop_ids_from_gguf(reader: Any, tokenizer: Tokenizer, path: Path) -> list[int]:
    """End of turn, end of sequence, then <|endoftext|>: the ids generation stops on."""
    ids = [gguf_field(reader, f"tokenizer.ggml.{k}_token_id", path, None) for k in ("eot", "eos")]
    return list(dict.fromkeys(int(i) for i in [*ids, tokenizer.eos_id] if i is not None))


def special_ids_from_gguf(reader: Any, path: Path) -> dict[str, Optional[int]]:
    """{"bos", "eos", "pad", "unk"}: the file's tokenizer.ggml.*_token_id (None where it has none)."""
    keys = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}
    ids = {k: gguf_field(reader, f"tokenizer.ggml.{name}_token_id", path, None) for k, name in keys.items()}
    return {k: None if v is None else int(v) for k, v in ids.items()}


def gguf_meta_extra(reader: Any, path: Path) -> dict[str, Any]:
    """What config.json keeps of the file's tokenizer metadata: its Jinja template, special ids and
    pre-tokenizer name (ModelMeta.extra)."""
    extra: dict[str, Any] = {SPECIAL_IDS_KEY: special_ids_from_gguf(reader, path)}
    jinja = gguf_field(reader, "tokenizer.chat_template", path, None)
    if jinja:
        extra[JINJA_KEY] = jinja
    pre = gguf_field(reader, "tokenizer.ggml.pre", path, None)
    if pre:
        extra[GGUF_PRE_KEY] = pre
    return extra


# --------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------

def local_gguf_path(gguf_file: str | Path) -> Path:
    """The file itself, or the one `pypi:PACKAGE/FILE` names inside an installed package."""
    if not str(gguf_file).startswith(PACKAGE_PATH_PREFIX):
        return Path(gguf_file)
    try:
        return package_file(str(gguf_file))
    except FileNotFoundError as e:
        raise LLMMakerError(str(e)) from None


def import_gguf(gguf_file: str | Path, out: str | Path, force: bool = False) -> Path:
    """Turn a llama GGUF file (a path or `pypi:PACKAGE/FILE`) into an llm-maker run directory; returns `out`."""
    path, out = local_gguf_path(gguf_file), Path(out)
    check_export_target(out, force, path)
    reader = open_gguf(path)
    cfg = llama_config_from_gguf(reader, path)
    check_dequantizable(reader, path)  # before the tokenizer: both are refusals, neither costs a read
    tokenizer = gguf_tokenizer(reader, path)
    sd = our_state_dict_from_gguf(reader, cfg, path)
    cfg = grow_vocab(sd, cfg, id_space(tokenizer))  # llm-maker special tokens the file lacks get rows
    model = LlamaModel(cfg)
    model.load_state_dict(sd, strict=True)
    source = str(path.resolve())
    name = gguf_field(reader, "general.name", path, None) or path.stem
    extra = gguf_meta_extra(reader, path)
    fp = fingerprint({"imported_from": source, "tokenizer_hash": tokenizer.hash, "model": cfg.to_dict()})
    meta = ModelMeta(stage="sft" if extra.get(JINJA_KEY) else "pretrain", recipe=name, fingerprint=fp,  # sft: chats
                     imported_from=source,
                     chat_template=template_name_of(extra.get(JINJA_KEY)),
                     stop_token_ids=stop_ids_from_gguf(reader, tokenizer, path), extra=extra)
    return write_imported_run(out, model, tokenizer, meta, name=name)
