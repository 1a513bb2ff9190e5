"""eval/multiple_choice.py: item parsing, lm-eval's request encoding, batched log-likelihoods equal
to one-at-a-time sums, acc vs acc_norm, and the training-loop hook."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model
from llm_maker.errors import DataError
from llm_maker.eval.multiple_choice import (
    MCItem,
    choose,
    encode_request,
    load_mc_items,
    loglikelihoods,
    score_items,
    training_hook,
)
from llm_maker.tokenizer.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, d_model=64, d_mlp=128, seq_len=32).eval()


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_items_and_errors_name_the_line_and_field(tmp_path):
    items = load_mc_items(DATA / "python_mc.jsonl")
    assert len(items) == 24 and all(isinstance(i, MCItem) and len(i.choices) == 4 for i in items)
    assert sorted({i.label for i in items}) == [0, 1, 2, 3]  # the gold answer is not always first
    cases = [({"context": "a", "choices": ["x"], "label": 0}, "choices` must be a list of at least 2"),
             ({"context": "a", "choices": ["x", "y"], "label": 2}, "`label` must be an index into the 2 choices"),
             ({"context": "a", "choices": ["x", "y"], "label": True}, "`label`"),
             ({"choices": ["x", "y"], "label": 0}, "`context` must be a string"),
             ("{oops", "not valid JSON")]
    for row, message in cases:
        path = write(tmp_path / "bad.jsonl", [{"context": "ok", "choices": ["a", "b"], "label": 1}, row])
        with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
            load_mc_items(path)
    with pytest.raises(DataError, match="no multiple-choice items"):
        load_mc_items(write(tmp_path / "empty.jsonl", [""]))


def test_encode_request_follows_lm_eval(tok):
    ctx, cont = encode_request(tok, "The answer is", " yes", tok.eos_id)
    assert ctx == tok.encode("The answer is") and ctx + cont == tok.encode("The answer is yes")
    # a context's trailing spaces move to the continuation, so " " + "yes" tokenizes as in running text
    ctx2, cont2 = encode_request(tok, "The answer is ", "yes", tok.eos_id)
    assert (ctx2, cont2) == (ctx, cont)
    # an empty context is conditioned on <|endoftext|>, the document boundary the model was trained on
    assert encode_request(tok, "", " yes", tok.eos_id) == ([tok.eos_id], tok.encode(" yes"))


def test_batched_loglikelihoods_equal_one_at_a_time_sums(model, tok, prose_texts):
    requests = [encode_request(tok, t[:40], " " + t[40:70], tok.eos_id) for t in prose_texts[:7]]
    requests.append(encode_request(tok, prose_texts[8][:300], " end", tok.eos_id))  # longer than seq_len: left-cut
    got = loglikelihoods(model, requests, batch_size=3)
    for (ctx, cont), ll in zip(requests, got, strict=False):
        seq = (ctx + cont)[-(model.config.seq_len + 1):]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0], dim=-1)  # (T, V)
        want = sum(logp[len(seq) - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)
    assert all(ll < 0 for ll in got)


def test_choose_acc_and_length_normalised_acc_differ_as_they_should():
    # the long choice has the lower total but the higher per-character log-likelihood
    assert choose([-6.0, -9.0], ("ab", "abcdefgh")) == (0, 1)
    assert choose([-3.0, -3.0], ("a", "b")) == (0, 0)  # ties: the first, as np.argmax / lm-eval


def test_score_items_counts_and_hook(model, tok):
    items = load_mc_items(DATA / "python_mc.jsonl")
    r = score_items(model, tok, items, batch_size=5)
    assert r["n"] == 24 and len(r["predictions"]) == 24
    assert r["correct"] == sum(p == i.label for (p, _), i in zip(r["predictions"], items, strict=False))
    assert r["acc"] == r["correct"] / 24 and r["acc_norm"] == r["correct_norm"] / 24
    assert score_items(model, tok, items, batch_size=24) == r  # batching does not change a prediction
    hook = training_hook(str(DATA / "python_mc.jsonl"), tok, max_items=8)
    model.train()
    out = hook(model)
    assert model.training  # the hook restores the mode
    assert set(out) == {"mc_acc", "mc_acc_norm"} and out["mc_acc"] == score_items(model, tok, items[:8])["acc"]
    assert training_hook(None, tok) is None


def test_pretraining_logs_multiple_choice_accuracy_at_eval_steps(tmp_path, tok, prose_texts):
    import csv

    import numpy as np

    from llm_maker.recipe import TrainConfig
    from llm_maker.train.batches import PretrainBatches
    from llm_maker.train.stage import multiple_choice_evaluations
    from llm_maker.train.trainer import run_training

    ids = np.array([i for t in tok.encode_batch(prose_texts[:300]) for i in t + [tok.eos_id]], dtype=np.int64)
    model = tiny_model(tok.vocab_size, n_layers=1, n_heads=2, n_kv_heads=1, seq_len=32)
    tc = TrainConfig(device="cpu", max_steps=4, micro_batch_size=4, eval_every=2, eval_batches=1, checkpoint_every=4,
                     log_every=1, warmup_steps=1, progress=False,
                     mc_eval=str(DATA / "python_mc.jsonl"), mc_eval_items=8)
    batches = PretrainBatches(ids, 32, 4, seed=0, val_tokens=ids[:2000])
    run_training(model, batches, tc, tmp_path, tok, {"stage": "pretrain"},
                 evaluations=multiple_choice_evaluations(tc, tok))  # what the pretrain stage passes
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert rows[1]["mc_acc"] == ""  # measured at eval steps (2, 4), carried between them like val_loss
    assert rows[3]["mc_acc"] == rows[2]["mc_acc"] and rows[3]["val_loss"] == rows[2]["val_loss"]
    items = load_mc_items(DATA / "python_mc.jsonl")[:8]
    assert float(rows[4]["mc_acc"]) == score_items(model, tok, items)["acc"]  # the final model's score
    assert rows[2]["mc_acc_norm"] != "" and 0 <= float(rows[2]["mc_acc_norm"]) <= 1


def test_recipe_resolves_and_checks_mc_eval(tmp_path):
    from llm_maker.errors import RecipeError
    from llm_maker.recipe import load_recipe

    (tmp_path / "items.jsonl").write_text((DATA / "python_mc.jsonl").read_text())
    (tmp_path / "r.yaml").write_text("train:\n  mc_eval: items.jsonl\n")
    assert load_recipe(tmp_path / "r.yaml").train.mc_eval == str(tmp_path / "items.jsonl")
    (tmp_path / "bad.yaml").write_text("sft:\n  train:\n    mc_eval: nope.jsonl\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: `sft.train.mc_eval` does not exist"):
        load_recipe(tmp_path / "bad.yaml")
