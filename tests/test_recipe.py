"""The recipe is validated in full before any compute, with errors naming the key and the file."""
from pathlib import Path

import pytest
import yaml

from llm_maker.cli import main
from llm_maker.errors import RecipeError
from llm_maker.recipe import load_recipe

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
    from llm_maker.recipe import parse_override

    p = write(tmp_path, {})
    key, value = parse_override("train.max_steps=7")
    assert load_recipe(p, overrides={key: value}).train.max_steps == 7
