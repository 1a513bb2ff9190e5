"""`llm-maker import-hf HF_DIR --out RUN_DIR`: a local Hugging Face Llama-family checkpoint
(e.g. SmolLM2-135M) becomes an llm-maker run to continue from.

    RUN_DIR/tokenizer/       tokenizer.json (its own, plus any missing llm-maker special token)
                             and manifest.json, as the tokenizer stage writes them
    RUN_DIR/pretrain/final/  the weights as an llm-maker model directory, and pretrain/manifest.json

so `llm-maker sft RECIPE` (run_dir: RUN_DIR) fine-tunes it, and generate / chat / export /
eval --suite work on it as on a run trained here. Weights map 1:1 (module names follow
LlamaForCausalLM; both rotate split halves). Special tokens the checkpoint lacks get new
embedding rows set to the mean of the existing ones, a neutral start for fine-tuning.

The model's identity is kept in config.json (ModelMeta): its own Jinja chat template
(chat_template.jinja or tokenizer_config.json's `chat_template`) in extra["jinja_chat_template"],
its bos/eos/pad/unk ids in extra["special_ids"], its end-of-turn ids (generation_config.json's
eos_token_id) as stop_token_ids, its name as the recipe, and stage sft when it has a chat template
(an instruct model). It pads with its own pad token when it names one, so no <|pad|> row is added.

Only what our decoder computes is accepted: model_type llama, SiLU, no attention/MLP biases,
head_dim = hidden_size / heads, plain RoPE (no rope scaling). Anything else is refused with
the config field that differs, before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from llm_maker.artifacts import atomic_dir, fingerprint, write_manifest
from llm_maker.errors import LLMMakerError, RecipeError
from llm_maker.export.hf import JINJA_KEY, SPECIAL_IDS_KEY, check_export_target
from llm_maker.model.llama import LlamaConfig, LlamaModel, count_parameters
from llm_maker.sft.templates import template_name_of
from llm_maker.tokenizer.pretrained import load_pretrained_tokenizer
from llm_maker.tokenizer.tokenizer import PAD, Tokenizer
from llm_maker.train.checkpoint import ModelMeta, write_model_files

SKIPPED_KEYS = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed here


def _field(hf: dict[str, Any], name: str, where: str) -> Any:
    if name not in hf:
        raise LLMMakerError(f"{where}: missing `{name}`")
    return hf[name]


def rope_theta_of(hf: dict[str, Any], where: str) -> float:
    """rope_theta from transformers 5.x `rope_parameters` or 4.x `rope_theta` / `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise LLMMakerError(f"{where}: rope type {rope_type!r} (rope scaling) is not supported; only plain RoPE")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_config_from_hf(hf: dict[str, Any], where: str) -> LlamaConfig:
    """Our LlamaConfig for a transformers config.json, or LLMMakerError naming the field that
    our decoder does not compute."""
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama":
        raise LLMMakerError(f"{where}: unsupported architecture {arch or '?'} (model_type {hf.get('model_type')!r}); "
                            "import-hf takes Llama-family checkpoints (model_type llama, LlamaForCausalLM)")
    checks = {"hidden_act": (hf.get("hidden_act", "silu"), "silu"),
              "attention_bias": (hf.get("attention_bias", False), False),
              "mlp_bias": (hf.get("mlp_bias", False), False), "pretraining_tp": (hf.get("pretraining_tp", 1) or 1, 1)}
    for name, (got, want) in checks.items():
        if got != want:
            raise LLMMakerError(f"{where}: `{name}` is {got!r}; only {want!r} is supported")
    d, heads = _field(hf, "hidden_size", where), _field(hf, "num_attention_heads", where)
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise LLMMakerError(f"{where}: `head_dim` {head_dim} x {heads} heads != hidden_size {d}; not supported")
    cfg = LlamaConfig(vocab_size=_field(hf, "vocab_size", where), n_layers=_field(hf, "num_hidden_layers", where),
                      d_model=d, n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                      d_mlp=_field(hf, "intermediate_size", where), seq_len=hf.get("max_position_embeddings", 2048),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), rope_theta=rope_theta_of(hf, where),
                      norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    try:
        cfg.validate()
    except ValueError as e:
        raise LLMMakerError(f"{where}: {e}") from None
    return cfg


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: model.safetensors, sharded safetensors (with their index) or
    pytorch_model.bin (loaded with weights_only=True)."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(str(hf_dir / shard)))
        return out
    if (hf_dir / "pytorch_model.bin").is_file():
        return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise LLMMakerError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def our_state_dict(hf_weights: dict[str, torch.Tensor], cfg: LlamaConfig, where: str) -> dict[str, torch.Tensor]:
    """transformers' names -> ours (drop `model.`), fp32; the head from the embedding when tied."""
    sd = {}
    for name, tensor in hf_weights.items():
        if name.endswith(SKIPPED_KEYS):
            continue
        ours = name[len("model."):] if name.startswith("model.") else name
        sd[ours] = tensor.to(torch.float32)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd.get("embed_tokens.weight")
    expected = _expected_keys(cfg)
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected or sd.get("lm_head.weight") is None:
        raise LLMMakerError(f"{where}: weights do not match a Llama of this config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return sd


def _expected_keys(cfg: LlamaConfig) -> set[str]:
    with torch.device("meta"):  # shapes only, no memory
        return set(LlamaModel(cfg).state_dict())


def grow_vocab(sd: dict[str, torch.Tensor], cfg: LlamaConfig, new_size: int) -> LlamaConfig:
    """Append rows for tokens the tokenizer gained (their mean: a neutral start); returns the new config."""
    n_new = new_size - cfg.vocab_size
    if n_new <= 0:
        return cfg
    for name in {"embed_tokens.weight", "lm_head.weight"}:
        w = sd[name]
        sd[name] = torch.cat([w, w.mean(dim=0, keepdim=True).expand(n_new, -1)], dim=0)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return LlamaConfig(**{**cfg.to_dict(), "vocab_size": new_size})


def read_json(file: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when the file is absent."""
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def token_text(value: Any) -> Optional[str]:
    """A tokenizer_config.json token entry: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def jinja_template_of(hf_dir: Path, tok_cfg: dict[str, Any]) -> Optional[str]:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
    {"name", "template"} whose "default" entry is the chat template)."""
    file = hf_dir / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8") or None
    jinja = tok_cfg.get("chat_template")
    if isinstance(jinja, list):
        named = {t.get("name"): t.get("template") for t in jinja if isinstance(t, dict)}
        jinja = named.get("default")
    return jinja if isinstance(jinja, str) and jinja else None


def _ids(value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    return [int(i) for i in items if isinstance(i, int)]


def model_special_ids(tokenizer: Tokenizer, tok_cfg: dict[str, Any], gen_cfg: dict[str, Any],
                      hf_cfg: dict[str, Any]) -> dict[str, Optional[int]]:
    """{"bos", "eos", "pad", "unk"} as the original has them: generation_config.json's (then
    config.json's) *_token_id, else the tokenizer_config.json token's id; eos and pad fall back
    to the tokenizer's own."""
    out: dict[str, Optional[int]] = {}
    for key in ("bos", "eos", "pad", "unk"):
        ids = _ids(gen_cfg.get(f"{key}_token_id")) or _ids(hf_cfg.get(f"{key}_token_id"))
        text = token_text(tok_cfg.get(f"{key}_token"))
        out[key] = ids[0] if ids else (tokenizer.token_id(text) if text else None)
    out["eos"] = tokenizer.eos_id if out["eos"] is None else out["eos"]
    out["pad"] = tokenizer.pad_id if out["pad"] is None else out["pad"]
    return out


def stop_ids_of(tokenizer: Tokenizer, tok_cfg: dict[str, Any], gen_cfg: dict[str, Any]) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list), else tokenizer_config.json's eos_token."""
    ids = _ids(gen_cfg.get("eos_token_id"))
    eos = token_text(tok_cfg.get("eos_token"))
    if not ids and eos and tokenizer.token_id(eos) is not None:
        ids = [tokenizer.token_id(eos)]
    return list(dict.fromkeys(ids))


def model_name(hf_cfg: dict[str, Any], hf_dir: Path) -> str:
    """config.json's `_name_or_path` basename (e.g. SmolLM2-135M-Instruct), else the folder's name."""
    name = Path(str(hf_cfg.get("_name_or_path") or "")).name
    return name if name and name not in (".", "..") else hf_dir.resolve().name


def hf_tokenizer(hf_dir: Path, tok_cfg: dict[str, Any]) -> Tokenizer:
    """The checkpoint's tokenizer, padding with its own pad token when tokenizer_config.json names
    one the tokenizer has (<|pad|> itself is our default: naming it would change the file's hash)."""
    pad = token_text(tok_cfg.get("pad_token"))
    if pad and pad != PAD:
        try:
            return load_pretrained_tokenizer(hf_dir, pad_token=pad)
        except (LLMMakerError, RecipeError):  # not a token of this tokenizer: add ours
            pass
    return load_pretrained_tokenizer(hf_dir)


def id_space(tokenizer: Tokenizer) -> int:
    return max(tokenizer.vocab_size, max(tokenizer.hf.get_vocab(with_added_tokens=True).values()) + 1)


def import_hf(hf_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Turn a local transformers Llama directory into an llm-maker run directory; returns `out`."""
    hf_dir, out = Path(hf_dir), Path(out)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise LLMMakerError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    check_export_target(out, force, hf_dir)
    hf_cfg = read_json(config_file)
    cfg = llama_config_from_hf(hf_cfg, str(config_file))
    tok_cfg, gen_cfg = read_json(hf_dir / "tokenizer_config.json"), read_json(hf_dir / "generation_config.json")
    tokenizer = hf_tokenizer(hf_dir, tok_cfg)
    sd = our_state_dict(read_hf_weights(hf_dir), cfg, str(hf_dir))
    cfg = grow_vocab(sd, cfg, id_space(tokenizer))
    model = LlamaModel(cfg)
    model.load_state_dict(sd, strict=True)
    fp = fingerprint({"imported_from": str(hf_dir.resolve()), "tokenizer_hash": tokenizer.hash, "model": cfg.to_dict()})
    jinja = jinja_template_of(hf_dir, tok_cfg)
    extra: dict[str, Any] = {SPECIAL_IDS_KEY: model_special_ids(tokenizer, tok_cfg, gen_cfg, hf_cfg)}
    if jinja:
        extra[JINJA_KEY] = jinja

    meta = ModelMeta(stage="sft" if jinja else "pretrain", recipe=model_name(hf_cfg, hf_dir), fingerprint=fp,
                     imported_from=str(hf_dir.resolve()), chat_template=template_name_of(jinja),
                     stop_token_ids=stop_ids_of(tokenizer, tok_cfg, gen_cfg), extra=extra)
    return write_imported_run(out, model, tokenizer, meta)


def write_imported_run(out: Path, model: LlamaModel, tokenizer: Tokenizer, meta: ModelMeta,
                       **pretrain_manifest: Any) -> Path:
    """An imported model as a run directory, atomically: tokenizer/ and pretrain/final/ with the
    manifests the tokenizer and pretrain stages would write (import-hf and import-gguf alike)."""
    cfg, fp, source = model.config, meta.fingerprint, meta.imported_from
    with atomic_dir(out) as tmp:
        (tmp / "tokenizer").mkdir()
        tokenizer.save(tmp / "tokenizer")
        write_manifest(tmp / "tokenizer", "tokenizer", fp, type="pretrained", vocab_size=tokenizer.vocab_size,
                       special_tokens=tokenizer.special_token_ids, pad_token=tokenizer.pad_token,
                       tokenizer_hash=tokenizer.hash, imported_from=source)
        (tmp / "pretrain" / "final").mkdir(parents=True)
        write_model_files(tmp / "pretrain" / "final", model, tokenizer, meta)
        write_manifest(tmp / "pretrain", "pretrain", fp, model=cfg.to_dict(), parameters=count_parameters(cfg),
                       tokenizer_hash=tokenizer.hash, imported_from=source, **pretrain_manifest,
                       summary={"steps": 0, "tokens_seen": None, "final_dir": str(out / "pretrain" / "final")})
    return out
