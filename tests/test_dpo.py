"""DPO: preference readers (pairs, messages, hh; jsonl and parquet), the built-in set, encoding and
its counted drops, the loss (log 2 at the start, a gradient that prefers the chosen), the stage
(files, manifest, reference log-probs computed once, exact resume) and 2 gloo ranks."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from helpers import tiny_model
from llm_maker.artifacts import read_manifest, write_manifest
from llm_maker.dpo import stage as dpo_stage
from llm_maker.dpo.data import (
    DPOBatches,
    builtin_preferences,
    encode_pairs,
    hh_dialogue,
    load_preferences,
    pad_pairs,
    split_pairs,
)
from llm_maker.dpo.loss import DPOLoss, completion_logprobs
from llm_maker.dpo.stage import run_dpo
from llm_maker.errors import DataError
from llm_maker.layout import RunPaths
from llm_maker.recipe import PreferenceDataConfig, recipe_from_dict
from llm_maker.sft.templates import IGNORE_INDEX, encode_chat
from llm_maker.stopping import StageStopped
from llm_maker.tokenizer.tokenizer import Tokenizer, train_bpe
from llm_maker.train import trainer
from llm_maker.train.checkpoint import load_model_dir, save_model_dir

N_PAIRS = 40


@pytest.fixture(scope="module")
def prefs():
    return builtin_preferences()


@pytest.fixture(scope="module")
def tok(prefs):
    texts = [m["content"] for t in prefs for m in t["prompt"]] + [t["rejected"] for t in prefs]
    return train_bpe(iter(texts + ["system user assistant\n"] * 20), vocab_size=600, min_frequency=2)


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- readers

USER = [{"role": "user", "content": "12 + 5 ="}]
LAYOUT_ROWS = {
    "pairs": [{"prompt": "12 + 5 =", "chosen": "17", "rejected": "18"},
              {"prompt": "Say hi.", "chosen": " Hi. ", "rejected": "No."}],
    "messages": [{"prompt": "12 + 5 =", "chosen": USER + [{"role": "assistant", "content": "17"}],
                  "rejected": USER + [{"role": "assistant", "content": "18"}]},
                 {"chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
                  "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "No."}]}],
    "hh": [{"chosen": "\n\nHuman: 12 + 5 =\n\nAssistant: 17", "rejected": "\n\nHuman: 12 + 5 =\n\nAssistant: 18"},
           {"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hi.", "rejected": "\n\nHuman: Say hi.\n\nAssistant: No."}],
}
EXPECTED = [{"prompt": USER, "chosen": "17", "rejected": "18"},
            {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "Hi.", "rejected": "No."}]


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
@pytest.mark.parametrize("layout", ["pairs", "messages", "hh"])
@pytest.mark.parametrize("named", [True, False])  # format: <layout>, or auto from the first row
def test_each_layout_reads_the_same_triples(tmp_path, layout, ext, named):
    path = write_rows(tmp_path / f"prefs{ext}", LAYOUT_ROWS[layout])
    triples, stats = load_preferences(PreferenceDataConfig(source=str(path), format=layout if named else "auto"), 0)
    assert [{k: t[k] for k in ("prompt", "chosen", "rejected")} for t in triples] == EXPECTED
    assert stats["format"] == layout and stats["rows"] == stats["kept"] == 2
    assert {t["source"] for t in triples} == {path.name}


def test_hh_splits_on_the_last_assistant_turn(tmp_path):
    dialogue = "\n\nHuman: What is 2 + 2?\n\nAssistant: 4.\n\nHuman: And 3 + 3?\n\nAssistant:"
    rows = [{"chosen": dialogue + " It is 6.", "rejected": dialogue + " It is 7.\n\nHuman: ok"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: b"}]
    triples, stats = load_preferences(PreferenceDataConfig(source=str(write_rows(tmp_path / "hh.jsonl", rows))), 0)
    assert triples[0]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"},
                                    {"role": "assistant", "content": "4."},
                                    {"role": "user", "content": "And 3 + 3?"}]
    assert triples[0]["chosen"] == "It is 6."
    assert triples[0]["rejected"] == "It is 7.\n\nHuman: ok"  # the last "Assistant:" splits, whatever follows
    assert stats["dropped"] == {"prompt_mismatch": 1} and len(triples) == 1
    assert hh_dialogue("\n\nHuman: x\n\nAssistant: y") == [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": "y"}]


# A parquet file has one schema: a row lacks a field when the file lacks the column (a null is a missing value).
@pytest.mark.parametrize("ext, row_name", [(".jsonl", r"prefs\.jsonl:3"), (".parquet", r"prefs\.parquet:row 0")])
def test_a_row_without_its_fields_names_file_and_row(tmp_path, ext, row_name):
    bad_row = {"prompt": "x", "chosen": "y", "other": "z"}
    rows = copy.deepcopy(LAYOUT_ROWS["pairs"]) + [bad_row] if ext == ".jsonl" else [bad_row] * 3
    path = write_rows(tmp_path / f"prefs{ext}", rows)
    with pytest.raises(DataError, match=row_name + r': no "rejected" field \(fields: chosen, other, prompt\)'):
        load_preferences(PreferenceDataConfig(source=str(path), format="pairs"), 0)
    bad = write_rows(tmp_path / f"bad{ext}", [{"prompt": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r'bad\.(jsonl:1|parquet:row 0): no "chosen" field'):
        load_preferences(PreferenceDataConfig(source=str(bad)), 0)
    split = write_rows(tmp_path / f"split{ext}", [{"chosen": USER + [{"role": "assistant", "content": "1"}],
                                                    "rejected": [{"role": "assistant", "content": "2"}]}])
    with pytest.raises(DataError, match="differ before their last message"):
        load_preferences(PreferenceDataConfig(source=str(split)), 0)


def test_unusable_rows_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "", "rejected": "c"},
            {"prompt": "a", "chosen": "b", "rejected": None}, {"prompt": "a", "chosen": "b", "rejected": "b"},
            {"prompt": "a <|im_end|>", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": " "}]
    triples, stats = load_preferences(PreferenceDataConfig(source=str(write_rows(tmp_path / "p.jsonl", rows))), 0)
    assert stats["dropped"] == {"identical": 1, "missing": 2, "special_token": 1}
    assert [t["rejected"] for t in triples] == ["c", ""]  # an empty rejected answer is a preference too


# ---------------------------------------------------------------------------------------- built-in set, encoding

def test_builtin_set_rejects_a_rambling_answer_that_never_ends(tok, prefs):
    assert len(prefs) == 900 and builtin_preferences() == prefs
    for t in prefs[:200]:
        assert t["rejected"].startswith(t["chosen"] + " ") and len(t["rejected"]) > len(t["chosen"]) + 10
        assert t["rejected_ends_turn"] is False and t["prompt"][-1]["role"] == "user"
    enc, stats = encode_pairs(tok, prefs[:50], "chatml", max_len=512)
    assert stats["kept"] == 50
    for t, pair in zip(prefs[:50], enc, strict=True):
        full, labels = encode_chat(tok, t["prompt"] + [{"role": "assistant", "content": t["chosen"]}], "chatml")
        assert pair.chosen.ids == full[:-1]  # what SFT encodes, less the unlearned newline after <|im_end|>
        assert [x for x in pair.chosen.labels if x != IGNORE_INDEX][-1] == tok.im_end_id
        assert tok.im_end_id not in [x for x in pair.rejected.labels if x != IGNORE_INDEX]
        n_prompt = pair.chosen.labels.count(IGNORE_INDEX)
        assert pair.rejected.ids[:n_prompt] == pair.chosen.ids[:n_prompt]


def test_too_long_pairs_and_prompts_are_counted_drops(tok, prefs):
    long_prompt = {"prompt": [{"role": "user", "content": "the quick brown fox " * 60}], "chosen": "a",
                   "rejected": "b"}
    long_answer = {"prompt": USER, "chosen": "17", "rejected": "the quick brown fox " * 60}
    enc, stats = encode_pairs(tok, [prefs[0], long_prompt, long_answer], "chatml", max_len=128)
    assert len(enc) == 1 and stats["dropped_prompt_too_long"] == 1 and stats["dropped_too_long"] == 1
    fits = max(len(enc[0].chosen.ids), len(enc[0].rejected.ids))
    assert encode_pairs(tok, prefs[:1], "chatml", max_len=fits)[1]["kept"] == 1  # dropped, never truncated
    assert encode_pairs(tok, prefs[:1], "chatml", max_len=fits - 1)[1]["dropped_too_long"] == 1


def test_heldout_split_keys_on_the_prompt(prefs):
    train, held = split_pairs(prefs, 0.2, "k")
    assert len(train) + len(held) == len(prefs) and 0.12 < len(held) / len(prefs) < 0.28
    twin = {**held[0], "chosen": "other", "rejected": "answers"}
    assert split_pairs([twin], 0.2, "k") == ([], [twin])  # the same prompt stays on its side
    assert split_pairs(prefs, 0.2, "other key")[1] != held


# ---------------------------------------------------------------------------------------- loss

def pair_batch(tok, prefs, n=8):
    enc, _ = encode_pairs(tok, prefs[:n], "chatml", max_len=128)
    T = max(len(s.ids) for p in enc for s in p) - 1
    return pad_pairs(enc, T, tok.pad_id)


def test_loss_is_log2_when_policy_is_reference_and_a_step_prefers_chosen(tok, prefs):
    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size, seq_len=128)
    module = DPOLoss(model, beta=0.5)
    xc, yc, xr, yr = pair_batch(tok, prefs)
    with torch.no_grad():
        ref_c, ref_r = module.pair_logprobs(xc, yc, xr, yr)
        logits = model(xc)  # the summed log-probs are those of the labelled tokens, in fp32
        mask = yc != IGNORE_INDEX
        by_hand = (logits.log_softmax(-1).gather(-1, yc.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
    assert torch.allclose(completion_logprobs(logits, yc), by_hand, atol=1e-4)
    assert torch.allclose(ref_c, by_hand, atol=1e-4)
    loss, parts = module(xc, yc, xr, yr, ref_c, ref_r)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert parts["reward_margin"].item() == pytest.approx(0.0, abs=1e-6) and parts["pref_acc"].item() == 0.0
    assert module(xc, yc).item() == pytest.approx(trainer.CausalLMLoss(model)(xc, yc).item())  # plain CE: val loss
    # one SGD step on the DPO loss raises the chosen log-prob relative to the rejected one
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        pi_c, pi_r = module.pair_logprobs(xc, yc, xr, yr)
    margin = (pi_c - ref_c) - (pi_r - ref_r)
    assert margin.mean().item() > 0.01
    assert module(xc, yc, xr, yr, ref_c, ref_r)[0].item() < math.log(2)


def test_sft_weight_adds_the_chosen_answers_cross_entropy(tok, prefs):
    """dpo.sft_weight: DPO + w x the chosen completions' mean per-token CE (the plain loss on them)."""
    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size, seq_len=128)
    xc, yc, xr, yr = pair_batch(tok, prefs)
    with torch.no_grad():
        ref_c, ref_r = DPOLoss(model, beta=0.5).pair_logprobs(xc, yc, xr, yr)
        plain, _ = DPOLoss(model, beta=0.5)(xc, yc, xr, yr, ref_c, ref_r)
        loss, parts = DPOLoss(model, beta=0.5, sft_weight=0.7)(xc, yc, xr, yr, ref_c, ref_r)
        ce = trainer.CausalLMLoss(model)(xc, yc)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + 0.7 * ce.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------- stage

TRAIN = dict(max_steps=8, micro_batch_size=4, lr=3e-3, warmup_steps=1, eval_every=4, eval_batches=4,
             checkpoint_every=4, log_every=1, progress=False, device="cpu", precision="fp32", weight_decay=0.0)


def make_run(tmp_path: Path, tok, prefs, extra_rows=(), **dpo) -> tuple[dict, RunPaths]:
    """A run dir with tokenizer/ and sft/final (a tiny random chat model), a pairs file, and its raw recipe."""
    paths = RunPaths.of(tmp_path / "run")
    tok.save(paths.tokenizer)
    write_manifest(paths.tokenizer, "tokenizer", "tokfp")
    model = tiny_model(tok.vocab_size, n_layers=1, n_heads=2, n_kv_heads=1, seq_len=128)
    save_model_dir(paths.sft / "final", model, tok, {"stage": "sft", "chat_template": "chatml",
                                                     "stop_token_ids": [tok.im_end_id, tok.eos_id]})
    write_manifest(paths.sft, "sft", "sftfp", use="final")
    rows = [{k: t[k] for k in ("prompt", "chosen", "rejected", "rejected_ends_turn")} for t in prefs[:N_PAIRS]]
    data = write_rows(tmp_path / "prefs.jsonl", rows + list(extra_rows))
    raw = {"run_dir": str(paths.root), "dpo": {"enabled": True, "beta": 0.5,
                                               "data": {"source": str(data), "heldout_fraction": 0.25},
                                               "train": {**TRAIN, **dpo.pop("train", {})}, **dpo}}
    return raw, paths


def metrics(stage_dir: Path) -> list[dict]:
    with open(stage_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


LONG_PROMPT = {"prompt": "the quick brown fox " * 80, "chosen": "a", "rejected": "b"}


def test_stage_starts_at_log2_and_writes_data_reference_manifest(tmp_path, tok, prefs):
    raw, paths = make_run(tmp_path, tok, prefs, extra_rows=[LONG_PROMPT],
                          use="best", train={"best_metric": "val_pref_acc"})
    out = run_dpo(recipe_from_dict(raw), paths)
    rows = metrics(out)
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy = reference
    assert float(rows[0]["reward_margin"]) == pytest.approx(0.0, abs=1e-5)
    assert float(rows[-1]["loss"]) < math.log(2) and float(rows[-1]["reward_margin"]) > 0
    assert [int(r["step"]) for r in rows if r["val_pref_acc"]][0] == 4  # measured from the first eval step on
    evals = [r for r in rows if int(r["step"]) in (4, 8)]
    assert all(r["val_pref_acc"] and r["val_reward_margin"] and r["val_loss"] for r in evals)
    m = read_manifest(out)
    too_long = encode_pairs(tok, prefs[:N_PAIRS], "chatml", max_len=129)[1]["dropped_too_long"]  # seq_len + 1
    assert m["pairs"] == N_PAIRS + 1 and m["dropped_prompt_too_long"] == 1 and m["dropped_too_long"] == too_long
    assert m["kept_train"] + m["kept_heldout"] == N_PAIRS - too_long and m["kept_heldout"] > 0
    train = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) + len(held) == N_PAIRS + 1
    assert train[0]["rejected_ends_turn"] is False
    ref = read_manifest(out / "reference")
    assert ref["identity"]["dir"] == str(paths.sft / "final") and ref["pairs"] == {"train": m["kept_train"],
                                                                                  "heldout": m["kept_heldout"]}
    # best/ by val_pref_acc (higher is better) is what later stages take (dpo.use: best)
    assert m["use"] == "best" and paths.model("dpo") == out / "best" and m["summary"]["best"]["metric"] == \
        "val_pref_acc"
    assert m["summary"]["best"]["value"] == max(float(r["val_pref_acc"]) for r in evals)
    _, _, meta = load_model_dir(out / "best")
    assert (meta.stage, meta.chat_template, meta.stop_token_ids) == ("dpo", "chatml", [tok.im_end_id, tok.eos_id])
    assert json.loads((out / "final" / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert (out / "best" / "tokenizer_config.json").is_file()
    assert run_dpo(recipe_from_dict(raw), paths) == out and read_manifest(out)["created_unix"] == m["created_unix"]


def test_an_explicit_reference_is_the_one_scored(tmp_path, tok, prefs):
    raw, paths = make_run(tmp_path, tok, prefs, train={"max_steps": 2, "eval_every": 2, "checkpoint_every": 2})
    other = tiny_model(tok.vocab_size, seed=1, n_layers=1, n_heads=2, n_kv_heads=1, seq_len=128)
    save_model_dir(tmp_path / "ref", other, tok, {"stage": "sft", "chat_template": "chatml"})
    raw["dpo"]["reference"] = str(tmp_path / "ref")
    out = run_dpo(recipe_from_dict(raw), paths)
    identity = read_manifest(out / "reference")["identity"]
    assert identity["dir"] == str(tmp_path / "ref") and identity["weights_sha256"] == \
        read_manifest(out)["reference"]["weights_sha256"]
    assert abs(float(metrics(out)[0]["loss"]) - math.log(2)) > 1e-3  # the policy starts away from this reference


def test_no_pair_left_is_a_clear_error(tmp_path, tok, prefs):
    rows = [{**LONG_PROMPT, "prompt": f"{i} {LONG_PROMPT['prompt']}"} for i in range(8)]  # 8 prompts: some train
    raw, paths = make_run(tmp_path, tok, prefs[:0], extra_rows=rows)
    with pytest.raises(DataError, match="none of the .* DPO training pairs fits model.seq_len=128 "
                                        r"\(too long: 0, prompt alone too long: \d"):
        run_dpo(recipe_from_dict(raw), paths)


class StopAt:
    """Wraps run_training: its batch source touches dpo/STOP when the step's micro-batch is read."""

    def __init__(self, real, step: int):
        self.real, self.step = real, step

    def __call__(self, model, batches, tc, out_dir, **kw):
        read = batches.micro_batch

        def micro_batch(index):
            if index == self.step - 1:
                (Path(out_dir) / "STOP").touch()
            return read(index)

        batches.micro_batch = micro_batch
        return self.real(model, batches, tc, out_dir, **kw)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tok, prefs, monkeypatch):
    raw_a, paths_a = make_run(tmp_path / "a", tok, prefs)
    raw_b, paths_b = make_run(tmp_path / "b", tok, prefs)
    run_dpo(recipe_from_dict(raw_a), paths_a)
    computed = []
    real_compute = dpo_stage.compute_reference
    monkeypatch.setattr(dpo_stage, "compute_reference", lambda *a, **k: computed.append(1) or real_compute(*a, **k))
    monkeypatch.setattr(trainer, "run_training", StopAt(trainer.run_training, step=3))
    with pytest.raises(StageStopped):
        run_dpo(recipe_from_dict(raw_b), paths_b)
    monkeypatch.undo()
    monkeypatch.setattr(dpo_stage, "compute_reference", lambda *a, **k: computed.append(1) or real_compute(*a, **k))
    run_dpo(recipe_from_dict(raw_b), paths_b, resume=True)
    assert computed == [1]  # the resume reused dpo/reference/
    a, b = metrics(paths_a.dpo), metrics(paths_b.dpo)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for col in ("loss", "val_loss", "reward_margin", "pref_acc", "val_pref_acc", "val_reward_margin"):
            assert (float(ra[col]) if ra[col] else None) == pytest.approx(float(rb[col]) if rb[col] else None,
                                                                          abs=1e-6), (ra["step"], col)
    wa, wb = (load_model_dir(p.dpo / "final")[0].state_dict() for p in (paths_a, paths_b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_batches_carry_the_reference_and_cover_every_pair(tok, prefs):
    enc, _ = encode_pairs(tok, prefs[:10], "chatml", max_len=256)
    ref = torch.arange(20, dtype=torch.float32).view(10, 2)
    b = DPOBatches(enc[:8], ref[:8], 4, tok.pad_id, seed=1, val_encoded=enc[8:], val_ref=ref[8:])
    xc, yc, xr, yr, rc, rr = b.micro_batch(0)
    assert xc.shape == xr.shape == (4, b.seq_len) and b.tokens_per_micro_batch == 8 * b.seq_len
    i = b.item_ids(0)[0]
    assert (rc[0].item(), rr[0].item()) == (2.0 * i, 2.0 * i + 1)
    assert xc[0, :len(enc[i].chosen.ids) - 1].tolist() == enc[i].chosen.ids[:-1]
    assert sorted(b.item_ids(0) + b.item_ids(1)) == list(range(8))
    val = list(b.val_batches())
    assert len(val) == 1 and val[0][4].tolist() == [16.0, 18.0]


# ---------------------------------------------------------------------------------------- 2 gloo ranks

def _worker(rank: int, world: int, port: int, raw: dict, run_dir: str, result: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from llm_maker.train.distributed import shutdown_distributed

    run_dpo(recipe_from_dict(raw), RunPaths.of(run_dir))
    if rank == 0:
        Path(result).write_text(json.dumps(read_manifest(Path(run_dir) / "dpo")["summary"]))
    dist.barrier()
    shutdown_distributed()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_two_ranks_end_at_the_loss_of_one_process(tmp_path, tok, prefs):
    train = {"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 6}
    raw_one, paths_one = make_run(tmp_path / "one", tok, prefs, train=train)
    raw_two, paths_two = make_run(tmp_path / "two", tok, prefs, train=train)
    run_dpo(recipe_from_dict(raw_one), paths_one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "two.json"
    torch.multiprocessing.spawn(_worker, args=(2, port, raw_two, str(paths_two.root), str(result)), nprocs=2,
                                join=True)
    one, two = read_manifest(paths_one.dpo)["summary"], json.loads(result.read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 6
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=1e-5)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    for ra, rb in zip(metrics(paths_one.dpo), metrics(paths_two.dpo), strict=True):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), abs=1e-5)
    Tokenizer.load(paths_two.tokenizer)  # the run dir is intact
