"""export/hf.py and export/card.py: a trained model exported to a transformers directory loads as
LlamaForCausalLM without remote code, gives our logits (1e-4) and our greedy tokens, and its
tokenizer's chat template gives our SFT ids; bad targets are refused and left untouched."""
import json

import numpy as np
import pytest
import torch

from helpers import prose_tokens, train_tiny
from llm_maker.cli import main
from llm_maker.errors import LLMMakerError
from llm_maker.export.card import render_card
from llm_maker.export.hf import export_hf, hf_weight_name
from llm_maker.model.llama import LlamaConfig
from llm_maker.serve.generate import generate
from llm_maker.sft.builtin import builtin_conversations
from llm_maker.sft.templates import encode_chat, hf_tokenizer_config, prompt_ids, stop_token_ids
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import load_model_dir, save_model_dir
from llm_maker.train.loss import CausalLMLoss

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # every test needs the two trained models and their HF export (~25 s to build)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def tokens(tok, prose_texts):
    """(train, held-out) token streams: the first 1200 paragraphs, and the rest."""
    return prose_tokens(tok, prose_texts[:1200]), prose_tokens(tok, prose_texts[1200:])


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokens, tok):
    """{"base": untied base model dir, "sft": tied model dir with the chatml template, as the SFT stage leaves it}."""
    root = tmp_path_factory.mktemp("models")
    base = save_model_dir(root / "run" / "pretrain" / "final", train_tiny(tokens[0], tok, tie=False), tok,
                          {"stage": "pretrain", "recipe": "tiny"})
    sft = save_model_dir(root / "run" / "sft" / "final", train_tiny(tokens[0], tok, tie=True, seed=1), tok,
                         {"stage": "sft", "recipe": "tiny", "chat_template": "chatml",
                          "stop_token_ids": stop_token_ids(tok, "chatml")})
    (sft / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config("chatml", 64)), encoding="utf-8")
    return {"base": base, "sft": sft}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model_dirs):
    out = tmp_path_factory.mktemp("hf")
    return {name: export_hf(d, out / name) for name, d in model_dirs.items()}


def val_batch(held_out, n=4, T=64):
    return torch.from_numpy(np.stack([held_out[i * T:(i + 1) * T] for i in range(n)]))  # (4, 64) of real text


@pytest.mark.parametrize("name", ["base", "sft"])
def test_export_loads_as_llama_without_remote_code_and_matches_logits(name, model_dirs, exported, tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported[name])  # no trust_remote_code
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours, _, _ = load_model_dir(model_dirs[name])
    c = hf.config
    assert (c.num_key_value_heads, c.num_attention_heads, c.hidden_size, c.max_position_embeddings) == (2, 4, 64, 64)
    assert c.rope_parameters["rope_theta"] == 5000.0 and c.rms_norm_eps == 1e-5
    assert c.tie_word_embeddings is (name == "sft")
    x = val_batch(tokens[1])
    with torch.no_grad():
        diff = (ours.eval()(x) - hf.eval()(x).logits).abs().max().item()
    assert diff < 1e-4
    # the model learned something: its loss on held-out text is far below uniform (ln 512 = 6.24)
    with torch.no_grad():
        assert CausalLMLoss(ours)(x[:, :-1], x[:, 1:]).item() < 5.6


@pytest.mark.parametrize("name", ["base", "sft"])
def test_greedy_generation_equals_ours_token_for_token(name, model_dirs, exported, tok, prose_texts):
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported[name]).eval()
    ours, _, meta = load_model_dir(model_dirs[name])
    stops = meta.stop_token_ids or [tok.eos_id]
    assert hf.generation_config.eos_token_id in (stops, stops[0])
    for text in prose_texts[:3]:
        ids = tok.encode(text)[:20]
        mine = list(generate(ours, ids, 30, stop_ids=stops))
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
        assert theirs == mine and len(mine) > 0


def test_exported_tokenizer_and_chat_template_give_our_sft_ids(exported, tok):
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported["sft"])
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == ("<|im_end|>", "<|pad|>", None)
    edge = [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "naïve café\n\n  x"},
            {"role": "assistant", "content": "\n ok ✓"}]
    for msgs in [edge] + [c["messages"] for c in builtin_conversations()[:20]]:
        assert hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=False) == encode_chat(tok, msgs, "chatml")[0]
        assert hf_tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True,
                                          return_dict=False) == prompt_ids(tok, msgs[:-1], "chatml")
    text = "The \"return\" statement, naïvely: x = [1, 2]\n"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text) == hf_tok(text)["input_ids"]
    base_tok = transformers.AutoTokenizer.from_pretrained(exported["base"])
    assert base_tok.eos_token == "<|endoftext|>" and base_tok.chat_template is None


def test_export_files_config_and_weight_names(exported, model_dirs):
    files = sorted(p.name for p in exported["base"].iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    from safetensors import safe_open

    with safe_open(str(exported["sft"] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    assert "model.layers.1.self_attn.k_proj.weight" in keys
    assert hf_weight_name("lm_head.weight") == "lm_head.weight"
    config = json.loads((exported["base"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 5000.0  # 4.x readers too
    assert "auto_map" not in config  # nothing to trust remotely
    gen = json.loads((exported["sft"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [3, 0] and gen["pad_token_id"] == 1


def test_model_card_has_the_published_cards_sections(exported):
    card = (exported["sft"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for heading in ("## Use", "## Architecture", "## Training", "## Evaluation", "## Intended use and limits"):
        assert heading in card
    # one architecture table for both cards (export/card.py), so the head dim sits beside the head counts
    assert "| attention heads (query / key-value) | 4 / 2 (head dim 16) |" in card and "apply_chat_template" in card
    facts = {"name": "m", "stage": "sft", "config": LlamaConfig().to_dict(), "parameters": 123,
             "chat_template": "chatml", "training": [{"stage": "sft", "steps": 5, "tokens_seen": 640,
                                                      "final_loss": 1.5, "val_loss": 2.0}],
             "recipe": None, "report": None, "lm_eval": {"lm_eval_version": "0.4.13", "table": "| t | acc |"}}
    rendered = render_card(facts)
    assert "| sft | 5 | 640 | 1.500 | 2.000 |" in rendered and "| t | acc |" in rendered


def test_bad_targets_are_refused_before_anything_is_written(tmp_path, model_dirs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LLMMakerError, match=r"--out .*out exists and is not empty; pass --force"):
        export_hf(model_dirs["base"], out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(model_dirs["base"]), "--format", "hf", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(LLMMakerError, match="holds the source model"):
        export_hf(model_dirs["base"], model_dirs["base"].parent, force=True)
    with pytest.raises(LLMMakerError, match="--dtype must be one of"):
        export_hf(model_dirs["base"], tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()
    assert main(["export", str(model_dirs["base"]), "--format", "hf", "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_cli_export_from_a_run_dir_picks_the_sft_model(tmp_path, model_dirs):
    run = model_dirs["sft"].parent.parent
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "config.json").read_text())["tie_word_embeddings"] is True
    assert main(["export", str(run), "--model", "base", "--format", "hf", "--out", str(tmp_path / "b"),
                 "--dtype", "bfloat16"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert hf.config.tie_word_embeddings is False and hf.dtype == torch.bfloat16
