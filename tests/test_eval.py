"""eval/: validation loss by hand, stop detection, exact match, and the stage on a synthetic run dir."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_tokenizer, random_model, successor_model, training_text
from llm_maker.artifacts import read_manifest, write_manifest
from llm_maker.errors import CheckpointError, DataError, LLMMakerError
from llm_maker.eval.evaluate import exact_match, read_heldout, run_eval, stop_table, validation_loss
from llm_maker.eval.report import cell, render_markdown
from llm_maker.layout import RunPaths
from llm_maker.pack.shards import unigram_loss
from llm_maker.recipe import Recipe
from llm_maker.train.checkpoint import save_model_dir


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def words(tok):
    """Two one-token words: the SFT stub answers " the" then stops; the base stub says " and" forever."""
    (the,), (and_,) = tok.encode(" the"), tok.encode(" and")
    return the, and_


def sft_stub(tok, words):
    return successor_model(tok.vocab_size, {words[0]: tok.im_end_id}, default=words[0])


def base_stub(tok, words):
    return successor_model(tok.vocab_size, {}, default=words[1])


# --------------------------------------------------------------------------------------
# validation_loss
# --------------------------------------------------------------------------------------

def hand_loss(model, tokens, seq_len, n_blocks):
    """Mean -log p(next token) over the first n_blocks blocks, one block at a time in float64."""
    nll = []
    with torch.no_grad():
        for r in range(n_blocks):
            block = torch.tensor(tokens[r * seq_len:r * seq_len + seq_len + 1], dtype=torch.long)
            logp = F.log_softmax(model(block[None, :-1])[0].double(), dim=-1)  # (T, V)
            nll += (-logp[torch.arange(len(block) - 1), block[1:]]).tolist()
    return sum(nll) / len(nll)


def test_validation_loss_equals_a_hand_computation():
    model = random_model(300, std=0.1)
    tokens = np.random.default_rng(0).integers(0, 300, size=3 * 16 + 5).astype(np.uint16)
    # 3 whole blocks of 16 (the 4 leftover tokens are never inputs); batches of 2, then 1.
    assert validation_loss(model, tokens, 16, 2, 10, "cpu") == pytest.approx(hand_loss(model, tokens, 16, 3), rel=1e-5)
    assert validation_loss(model, tokens, 16, 2, 1, "cpu") == pytest.approx(hand_loss(model, tokens, 16, 2), rel=1e-5)
    # A split shorter than a block is one shorter block.
    assert validation_loss(model, tokens[:10], 16, 2, 1, "cpu") == pytest.approx(hand_loss(model, tokens[:10], 9, 1),
                                                                                rel=1e-5)
    with pytest.raises(DataError, match="the validation split holds 1 tokens; need at least 2"):
        validation_loss(model, tokens[:1], 16, 2, 1, "cpu")


# --------------------------------------------------------------------------------------
# stop table and exact match
# --------------------------------------------------------------------------------------

def user(text):
    return [{"role": "user", "content": text}]


def test_stop_table_counts_stops_and_tokens(tok, words):
    models = {"base": base_stub(tok, words), "sft": sft_stub(tok, words)}
    chats = [("recipe", user("What is a list?")), ("heldout", user("Name a colour."))]
    table = stop_table(models, tok, chats, "chatml", 6, "cpu")
    assert table["stop_fraction"] == {"base": 0.0, "sft": 1.0}
    for row, (source, messages) in zip(table["rows"], chats, strict=False):
        assert row["source"] == source and row["prompt"] == messages[-1]["content"]
        assert row["base"] == {"text": " and" * 6, "stopped": False, "ended_document": False, "n_tokens": 6}
        assert row["sft"] == {"text": " the", "stopped": True, "ended_document": False, "n_tokens": 1}
    # parchment stops on <|endoftext|>, which this stub never says: no stops counted.
    assert stop_table(models, tok, chats[:1], "parchment", 4, "cpu")["stop_fraction"] == {"base": 0.0, "sft": 0.0}
    # A base model that ends the *document* (<|endoftext|>) halts generation, but has not
    # learned to end its turn: counted apart, not as a stop.
    doc_ender = successor_model(tok.vocab_size, {words[0]: tok.eos_id}, default=words[0])
    table = stop_table({"base": doc_ender}, tok, chats, "chatml", 6, "cpu")
    assert table["stop_fraction"] == {"base": 0.0} and table["ended_document_fraction"] == {"base": 1.0}
    assert table["rows"][0]["base"]["n_tokens"] == 1
    # No SFT model: empty cells and no fraction.
    table = stop_table({"base": models["base"], "sft": None}, tok, chats, "chatml", 3, "cpu")
    assert table["stop_fraction"] == {"base": 0.0, "sft": None}
    assert [r["sft"] for r in table["rows"]] == [None, None]


def test_exact_match_compares_stripped_answers(tok, words):
    models = {"base": base_stub(tok, words), "sft": sft_stub(tok, words), "none": None}
    items = [user("q1") + [{"role": "assistant", "content": "the "}],
             user("q2") + [{"role": "assistant", "content": "a different answer"}],
             user("q3") + [{"role": "assistant", "content": "the"}]]
    em = exact_match(models, tok, items, "chatml", 10, "cpu")
    assert em["n_items"] == 3 and em["correct"] == {"base": 0, "sft": 2}
    assert em["accuracy"] == {"base": 0.0, "sft": pytest.approx(2 / 3), "none": None}
    assert em["examples"][0] == {"prompt": "q1", "reference": "the", "base": ("and " * 10).strip(),
                                 "sft": "the", "none": None}


def test_exact_match_is_the_same_when_answers_are_cut_at_the_first_mismatch(tok, words, monkeypatch):
    import llm_maker.eval.evaluate as evaluate

    monkeypatch.setattr(evaluate, "EXAMPLES_IN_REPORT", 1)  # items after the first take the early-exit path
    models = {"base": base_stub(tok, words), "sft": sft_stub(tok, words)}
    refs = ["the", "  the\n", "the end", "and", "and and and and", "t", ""]
    items = [user(f"q{i}") + [{"role": "assistant", "content": r}] for i, r in enumerate(refs)]
    em = exact_match(models, tok, items, "chatml", 4, "cpu")
    # base says " and and and and" (4 tokens, cut): matches "and and and and" only.
    assert em["correct"] == {"base": 1, "sft": 2} and len(em["examples"]) == 1


@pytest.mark.parametrize("answer,reference,possible", [
    ("", "the cat", True), ("  the c", "the cat", True), ("the cat  \n", "the cat", True),
    ("the cat s", "the cat", False), ("a", "the cat", False), ("caf\ufffd", "café", True),
])
def test_can_still_match(answer, reference, possible):
    from llm_maker.eval.evaluate import can_still_match

    assert can_still_match(answer, reference) is possible


def test_read_heldout_keeps_conversations_that_end_with_an_answer(tmp_path):
    assert read_heldout(tmp_path / "missing.jsonl") == []
    path = tmp_path / "heldout.jsonl"
    answered = user("hi") + [{"role": "assistant", "content": "hello"}]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (user("no answer"), answered)))
    assert read_heldout(path) == [answered]
    path.write_text("\n{not json\n")
    with pytest.raises(DataError, match=r"heldout.jsonl:2: not valid JSON"):
        read_heldout(path)


# --------------------------------------------------------------------------------------
# The stage on a synthetic run directory
# --------------------------------------------------------------------------------------

HELDOUT = [("What word comes first?", "the"), ("Say it again.", " the "), ("Anything else?", "no"),
           ("And now?", "something longer than the answer")]


def make_run(tmp_path, tok, words, with_sft=True) -> RunPaths:
    """pack/ (numpy + manifest), pretrain/{final,manifest}, and optionally sft/{final,data,manifest}."""
    paths = RunPaths.of(tmp_path / "run")
    ids = np.array(tok.encode(" ".join(training_text(3000))), dtype=np.uint16)
    split = len(ids) * 3 // 4
    paths.pack.mkdir(parents=True)
    ids[:split].tofile(paths.pack / "train.bin")
    ids[split:].tofile(paths.pack / "val.bin")
    write_manifest(paths.pack, "pack", "pack-fp", dtype="uint16", vocab_size=tok.vocab_size, train_tokens=split,
                   val_tokens=len(ids) - split, tokenizer_hash=tok.hash)
    save_model_dir(paths.pretrain / "final", base_stub(tok, words), tok,
                   {"stage": "pretrain", "tokens_seen": 12_345, "steps": 10})
    write_manifest(paths.pretrain, "pretrain", "pretrain-fp", summary={"tokens_seen": 12_345, "steps": 10})
    if with_sft:
        save_model_dir(paths.sft / "final", sft_stub(tok, words), tok, {"stage": "sft", "chat_template": "chatml"})
        write_manifest(paths.sft, "sft", "sft-fp", summary={"tokens_seen": 999, "steps": 3})
        lines = [json.dumps({"messages": user(q) + [{"role": "assistant", "content": a}]}) for q, a in HELDOUT]
        (paths.sft / "data").mkdir()
        (paths.sft / "data" / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def small_recipe() -> Recipe:
    r = Recipe(name="synthetic")
    r.train.device = "cpu"
    r.train.micro_batch_size = 2
    r.eval.max_new_tokens = 6
    r.eval.val_batches = 2
    r.eval.precision = "fp32"  # scores compared exactly with validation_loss on the fp32 model
    return r


def test_run_eval_writes_the_report(tok, words, tmp_path):
    paths = make_run(tmp_path, tok, words)
    out = run_eval(small_recipe(), paths)
    assert out == paths.eval
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"run", "device", "precision", "template", "models", "validation", "stop_table",
                           "exact_match", "base_completions", "eval_seconds"}
    assert report["precision"] == "fp32"
    base_params = base_stub(tok, words).num_parameters()
    assert report["models"]["base"]["parameters"] == base_params
    assert report["models"]["base"]["tokens_seen"] == 12_345
    assert report["models"]["sft"]["tokens_seen"] == 999  # not in config.json: read from sft/manifest.json
    assert report["template"] == "chatml"

    v = report["validation"]
    val = np.fromfile(paths.pack / "val.bin", dtype=np.uint16)
    assert len(val) > 64 * 2 * 2 and v["tokens_scored"] == 64 * 2 * 2
    assert v["base"]["loss"] == pytest.approx(validation_loss(base_stub(tok, words), val, 64, 2, 2, "cpu"))
    assert v["base"]["perplexity"] == pytest.approx(math.exp(v["base"]["loss"]))
    assert v["unigram_loss"] == pytest.approx(unigram_loss(paths.pack))

    st = report["stop_table"]
    assert [r["source"] for r in st["rows"]] == ["recipe"] * 3 + ["heldout"] * 3
    assert [r["prompt"] for r in st["rows"][3:]] == [q for q, _ in HELDOUT[:3]]
    assert st["stop_fraction"] == {"base": 0.0, "sft": 1.0}
    assert all(r["sft"]["n_tokens"] == 1 and r["base"]["n_tokens"] == 6 for r in st["rows"])

    em = report["exact_match"]
    assert em["n_items"] == 4 and em["correct"] == {"base": 0, "sft": 2} and em["accuracy"]["sft"] == 0.5
    assert [c["prompt"] for c in report["base_completions"]] == Recipe().eval.prompts
    assert report["base_completions"][0]["greedy"] == " and" * 6

    md = (out / "report.md").read_text()
    assert md == render_markdown(report)
    for heading in ("## Models", "## Validation loss", "## Does it answer and stop? (base vs SFT)",
                    "## Exact match on held-out SFT items", "## Base model completions"):
        assert heading in md
    assert "| What is the capital of France? | recipe | cut@6 and and and and and and | eos@1 the |" in md
    assert "| **stopped** |  | **0/6 (0%)** | **6/6 (100%)** |" in md
    assert "| sft | 50% | 2/4 |" in md
    manifest = read_manifest(out)
    assert manifest["stage"] == "eval" and manifest["report"] == "report.json"


def test_run_eval_is_skipped_when_up_to_date_and_rerun_on_change(tok, words, tmp_path, monkeypatch):
    paths = make_run(tmp_path, tok, words)
    recipe = small_recipe()
    run_eval(recipe, paths)
    first = read_manifest(paths.eval)["created_unix"]
    run_eval(recipe, paths)
    assert read_manifest(paths.eval)["created_unix"] == first
    run_eval(recipe, paths, force=True)
    assert read_manifest(paths.eval)["created_unix"] > first
    second = read_manifest(paths.eval)["created_unix"]
    recipe.eval.prompts = ["Once upon a time"]  # the eval config is part of the fingerprint
    run_eval(recipe, paths)
    assert read_manifest(paths.eval)["created_unix"] > second
    assert json.loads((paths.eval / "report.json").read_text())["base_completions"][0]["prompt"] == "Once upon a time"


def test_run_eval_without_sft_and_without_a_base_model(tok, words, tmp_path):
    paths = make_run(tmp_path, tok, words, with_sft=False)
    report = json.loads((run_eval(small_recipe(), paths) / "report.json").read_text())
    assert report["models"]["sft"] is None and report["validation"]["sft"] is None
    assert report["stop_table"]["stop_fraction"] == {"base": 0.0, "sft": None}
    assert len(report["stop_table"]["rows"]) == 3 and report["exact_match"]["n_items"] == 0
    md = (paths.eval / "report.md").read_text()
    assert "No held-out SFT items" in md and "| sft |" not in md

    (paths.pretrain / "final" / "model.safetensors").unlink()
    with pytest.raises(LLMMakerError, match=r"pretrain/final: no finished base model; run the `pretrain` stage"):
        run_eval(small_recipe(), paths, force=True)


def test_run_eval_rejects_a_pack_from_another_tokenizer(tok, words, tmp_path):
    paths = make_run(tmp_path, tok, words, with_sft=False)
    fields = {k: v for k, v in read_manifest(paths.pack).items() if k not in ("stage", "fingerprint", "created_unix")}
    write_manifest(paths.pack, "pack", "pack-fp", **{**fields, "tokenizer_hash": "0123abcd"})
    with pytest.raises(CheckpointError, match="packed with tokenizer 0123abcd, but .* was trained with"):
        run_eval(small_recipe(), paths)


def test_markdown_cells_stay_on_one_line():
    assert cell("a | b\n\nc") == "a \\| b c"
    assert cell("x" * 200, 10) == "x" * 9 + "…"
    assert cell(None) == "—"


def test_eval_precision_auto_follows_the_device_rule(tok, words, tmp_path):
    from llm_maker.devices import inference_dtype, precision_name

    paths = make_run(tmp_path, tok, words)
    recipe = small_recipe()
    recipe.eval.precision = "auto"
    report = json.loads((run_eval(recipe, paths) / "report.json").read_text())
    assert report["precision"] == precision_name(inference_dtype("auto", "cpu"))  # bf16 on an AMX-BF16 CPU
    val = np.fromfile(paths.pack / "val.bin", dtype=np.uint16)
    fp32 = validation_loss(base_stub(tok, words), val, 64, 2, 2, "cpu")
    assert report["validation"]["base"]["loss"] == pytest.approx(fp32, rel=1e-3)  # bf16 weights: close, not equal
