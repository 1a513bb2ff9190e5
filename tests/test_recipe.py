"""The recipe is validated in full before any compute, with errors naming the key and the file."""
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from llm_maker.cli import main
from llm_maker.errors import RecipeError
from llm_maker.model.llama import LlamaConfig
from llm_maker.recipe import (
    ModelConfigSpec,
    Recipe,
    TemplateName,
    TrainConfig,
    load_recipe,
    parse_override,
    recipe_from_dict,
    resolve_paths,
    validate_recipe,
)
from llm_maker.sft.templates import TEMPLATE_SPECS
from llm_maker.typed_yaml import parse_dataclass

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_demo_recipe_loads():
    r = load_recipe(ROOT / "configs" / "demo.yaml")
    assert r.name == "demo" and r.model.preset == "tiny" and r.sft.template == "chatml"
    assert r.train.lr == pytest.approx(3e-3)


@pytest.mark.parametrize("data,key", [
    ({"trian": {}}, "trian"),
    ({"train": {"max_stepz": 3}}, "train.max_stepz"),
    ({"data": {"sources": [{"type": "text", "path": "x", "colour": 1}]}}, r"data.sources\[0\].colour"),
])
def test_unknown_key_names_key_and_file(tmp_path, data, key):
    p = write(tmp_path, data)
    with pytest.raises(RecipeError, match=rf"{p}.*unknown key `{key}`"):
        load_recipe(p)


@pytest.mark.parametrize("model,key", [
    ({"d_model": 130, "n_heads": 4}, "model.d_model"),
    ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
    ({"preset": "7b"}, "model.preset"),
])
def test_impossible_shapes(tmp_path, model, key):
    p = write(tmp_path, {"model": model})
    with pytest.raises(RecipeError, match=rf"{p}: `{key}`"):
        load_recipe(p)


def test_missing_input_file_named(tmp_path):
    p = write(tmp_path, {"data": {"sources": [{"type": "jsonl", "path": "nope.jsonl"}]}})
    with pytest.raises(RecipeError, match=r"data.sources\[0\].path.*nope.jsonl"):
        load_recipe(p)


def test_wrong_type_and_uint16_with_big_vocab(tmp_path):
    with pytest.raises(RecipeError, match=r"train.max_steps.*wrong type"):
        load_recipe(write(tmp_path, {"train": {"max_steps": "many"}}))
    with pytest.raises(RecipeError, match=r"pack.dtype.*uint16.*70000"):
        load_recipe(write(tmp_path, {"tokenizer": {"vocab_size": 70000}, "pack": {"dtype": "uint16"}}))


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    (tmp_path / "corpus.txt").write_text("hello")
    r = load_recipe(write(tmp_path, {"data": {"sources": [{"type": "text", "path": "corpus.txt"}]}}))
    assert Path(r.data.sources[0].path) == tmp_path / "corpus.txt"


def test_cli_bad_recipe_exits_nonzero_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = write(tmp_path, {"run_dir": "runs/x", "trian": {}})
    assert main(["pipeline", str(p)]) == 2
    err = capsys.readouterr().err
    assert "unknown key `trian`" in err and str(p) in err
    assert not (tmp_path / "runs").exists()


def test_cli_override(tmp_path):
    p = write(tmp_path, {})
    key, value = parse_override("train.max_steps=7")
    assert load_recipe(p, overrides={key: value}).train.max_steps == 7


# --------------------------------------------------------------------------------------
# Closed choices, model dims from LlamaConfig, the seed rule, the named steps
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,message", [
    ({"tokenizer": {"type": "wordpiece"}}, "`tokenizer.type` must be bpe or pretrained, got 'wordpiece'"),
    ({"pack": {"dtype": "int8"}}, "`pack.dtype` must be one of auto, uint16, uint32, got 'int8'"),
    ({"train": {"precision": "fp8"}}, "`train.precision` must be one of auto, bf16, fp16, fp32, got 'fp8'"),
    ({"sft": {"template": "llama3"}}, "`sft.template` must be chatml or parchment, got 'llama3'"),
    ({"data": {"sources": [{"type": "csv"}]}},
     r"`data.sources\[0\].type` must be one of builtin, text, jsonl, parquet, fineweb-edu, got 'csv'"),
])
def test_a_closed_choice_names_key_file_and_allowed_values(tmp_path, data, message):
    p = write(tmp_path, data)
    with pytest.raises(RecipeError, match=rf"^{p}: {message}$"):
        load_recipe(p)


def test_fp16_is_a_valid_precision(tmp_path):
    assert load_recipe(write(tmp_path, {"train": {"precision": "fp16"}})).train.precision == "fp16"


def test_template_choice_matches_the_templates():
    assert typing.get_args(TemplateName) == tuple(TEMPLATE_SPECS)


def test_model_keys_are_llama_config_fields():
    dims = [f.name for f in dataclasses.fields(LlamaConfig)]
    assert [f.name for f in dataclasses.fields(ModelConfigSpec)] == ["preset", *dims, "init_from"]
    assert all(f.default is None for f in dataclasses.fields(ModelConfigSpec) if f.name in dims)


def test_init_from_needs_no_preset_and_refuses_dims(tmp_path):
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "config.json").write_text("{}")
    r = load_recipe(write(tmp_path, {"model": {"preset": None, "init_from": "start"}}))
    assert r.model.init_from == str(tmp_path / "start") and r.model.preset is None
    with pytest.raises(RecipeError, match=r"`model.d_model` cannot be set with model.init_from"):
        load_recipe(write(tmp_path, {"model": {"preset": None, "init_from": "start", "d_model": 64}}))
    with pytest.raises(RecipeError, match=r"`model.n_layers` is required when no preset gives it"):
        load_recipe(write(tmp_path, {"model": {"preset": None}}))


def test_the_top_level_seed_seeds_every_stage_unless_it_sets_its_own(tmp_path):
    r = load_recipe(write(tmp_path, {"seed": 7}))
    assert (r.seed, r.train.seed, r.sft.train.seed) == (7, 7, 7)
    r = load_recipe(write(tmp_path, {"seed": 7, "train": {"seed": 3}}))
    assert (r.seed, r.train.seed, r.sft.train.seed) == (7, 3, 7)
    demo = load_recipe(ROOT / "configs" / "demo.yaml")  # the demo's seeds are the old defaults
    assert (demo.seed, demo.train.seed, demo.sft.train.seed) == (1337, 1337, 1337)


def test_fingerprint_fields_leave_out_bookkeeping_only():
    base = TrainConfig(seed=1).fingerprint_fields()
    assert TrainConfig(seed=1, log_every=1, checkpoint_every=5, eval_every=3, progress=False,
                       wandb_project="x").fingerprint_fields() == base
    assert TrainConfig(seed=1, lr=1e-4).fingerprint_fields() != base
    assert TrainConfig(seed=2).fingerprint_fields() != base
    assert {"device", "precision", "compile", "distributed", "optimizer"} <= set(base)


def test_paths_are_resolved_in_their_own_step(tmp_path):
    r = recipe_from_dict({"data": {"sources": [{"type": "text", "path": "corpus.txt"}]}}, check_files=False)
    assert Path(r.data.sources[0].path) == Path.cwd() / "corpus.txt"
    raw = parse_dataclass(Recipe, {"tokenizer": {"type": "pretrained", "path": "tok.json"},
                                   "sft": {"data": {"source": "hf:x/y", "mixture": [{"source": "a.jsonl"}]}}},
                          "", "r.yaml")
    resolve_paths(raw, tmp_path)
    assert raw.tokenizer.path == str(tmp_path / "tok.json")
    assert raw.sft.data.source == "hf:x/y" and raw.sft.data.mixture[0].source == str(tmp_path / "a.jsonl")
    with pytest.raises(RecipeError, match=r"r.yaml: `tokenizer.path` does not exist: .*tok.json"):
        validate_recipe(raw, "r.yaml")


def test_source_file_is_not_a_yaml_key(tmp_path):
    with pytest.raises(RecipeError, match="unknown key `source_file`"):
        load_recipe(write(tmp_path, {"source_file": "x.yaml"}))


def test_init_from_with_preset_null_is_accepted(tmp_path):
    """Dims cannot be given beside init_from, so `preset: null` must not ask for them."""
    from llm_maker.recipe import recipe_from_dict

    r = recipe_from_dict({"model": {"preset": None, "init_from": str(tmp_path)}}, "r.yaml", check_files=False)
    assert r.model.preset is None and r.model.init_from == str(tmp_path)
