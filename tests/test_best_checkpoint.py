"""The best checkpoint, not just the last: best/ at the evaluation with the best validation metric,
early stopping, the same best/ after a stop and resume, never a non-finite best/, and the SFT
stage's default (sft.use: best) taken by eval, chat and the cards."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tokenizer, tiny_model, training_text
from llm_maker.artifacts import read_json, read_manifest, write_manifest
from llm_maker.cli import _model_dir
from llm_maker.errors import CheckpointError, RecipeError
from llm_maker.layout import RunPaths
from llm_maker.recipe import TrainConfig, recipe_from_dict
from llm_maker.sft.builtin import builtin_conversations
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.batches import PretrainBatches
from llm_maker.train.checkpoint import load_model_dir, read_trainer_state, save_model_dir
from llm_maker.train.trainer import run_training

EVAL_EVERY = 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread runs their matmuls faster than two that share 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def overfit_tokens(tok):
    """300 training tokens of one document and 2,000 held-out tokens of another: the held-out
    loss falls while the model learns what the two share, then rises as it learns the 300 by heart."""
    texts = training_text()
    return (np.array(tok.encode(texts[0])[:300], dtype=np.uint16),
            np.array(tok.encode(texts[1])[:2000], dtype=np.uint16))


def config(**kw) -> TrainConfig:
    base = dict(max_steps=30, micro_batch_size=4, lr=1e-2, warmup_steps=2, min_lr_ratio=1.0, weight_decay=0.0,
                eval_every=EVAL_EVERY, eval_batches=2, checkpoint_every=EVAL_EVERY, keep_checkpoints=10, log_every=5,
                progress=False, device="cpu", precision="fp32", seed=0, keep_best=True)
    return TrainConfig(**{**base, **kw})


def train(out: Path, tok, tokens, cls=PretrainBatches, seed: int = 0, resume: bool = False, **kw) -> dict:
    train_ids, val_ids = tokens
    return run_training(tiny_model(tok.vocab_size, seed, seq_len=32),
                        cls(train_ids, 32, 4, seed=0, val_tokens=val_ids), config(**kw), out, tok, {"stage": "t"},
                        resume=resume)


def evaluations(out: Path) -> list[tuple[int, float]]:
    """(step, val_loss) of the metrics.csv rows of eval steps (any other row repeats the last one's)."""
    with open(out / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader(f) if int(r["step"]) % EVAL_EVERY == 0]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def config_json(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_best_is_the_lowest_evaluation_and_final_the_last(tmp_path, tok, overfit_tokens):
    summary = train(tmp_path, tok, overfit_tokens)
    evals = evaluations(tmp_path)
    best_step, best_val = min(evals, key=lambda e: e[1])
    assert evals[0][1] > best_val < evals[-1][1]  # the held-out loss fell, then rose
    best, final = config_json(tmp_path / "best"), config_json(tmp_path / "final")
    assert (best["steps"], round(best["val_loss"], 6), best["kept"]) == (best_step, best_val, "best")
    assert best["best"] == {"metric": "val_loss", "value": best["val_loss"], "step": best_step}
    assert {p.name for p in (tmp_path / "best").iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    at_best = weights(tmp_path / "checkpoints" / f"step_{best_step:08d}")
    assert all(torch.equal(t, at_best[k]) for k, t in weights(tmp_path / "best").items())
    assert (final["steps"], final["kept"], final["best"]["step"]) == (30, "final", best_step)
    assert round(final["val_loss"], 6) == evals[-1][1]
    assert summary["best"] == {"metric": "val_loss", "value": best["val_loss"], "step": best_step,
                               "last_value": final["val_loss"], "dir": str(tmp_path / "best")}
    assert not summary["early_stopped"]
    # without keep_best the best is still tracked (for early stopping and the summary), not written
    off = train(tmp_path / "off", tok, overfit_tokens, keep_best=False)
    assert off["best"]["step"] == best_step and off["best"]["dir"] is None and not (tmp_path / "off" / "best").exists()


def test_early_stopping_finishes_after_the_patience(tmp_path, tok, overfit_tokens):
    summary = train(tmp_path, tok, overfit_tokens, early_stop_patience=2)
    evals = evaluations(tmp_path)
    best_step = summary["best"]["step"]
    stop = best_step + 2 * EVAL_EVERY  # two evaluations after the best, none better
    assert summary["early_stopped"] and not summary["stopped"] and summary["steps"] == stop < 30
    assert evals[-1][0] == stop and [s for s, _ in evals if s > best_step] == [best_step + 5, stop]
    assert config_json(tmp_path / "final")["steps"] == stop and config_json(tmp_path / "best")["steps"] == best_step
    state, _ = read_trainer_state(tmp_path / "checkpoints" / f"step_{stop:08d}" / "trainer_state.json")
    assert (state.best_step, state.evals_since_best) == (best_step, 2)
    # a resume of the finished run (final/ lost) trains no further: the spent patience is in the checkpoint
    shutil.rmtree(tmp_path / "final")
    again = train(tmp_path, tok, overfit_tokens, seed=7, resume=True, early_stop_patience=2)
    assert again["steps"] == stop and again["early_stopped"] and config_json(tmp_path / "final")["steps"] == stop
    assert evaluations(tmp_path) == evals
    # it changes the final weights, so it is part of the fingerprint; keep_best and best_metric are not
    base = config().fingerprint_fields()
    assert config(keep_best=False, best_metric="val_loss").fingerprint_fields() == base
    assert config(early_stop_patience=2).fingerprint_fields() != base


def test_stop_and_resume_keep_the_same_best_bitwise(tmp_path, tok, overfit_tokens, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, tok, overfit_tokens, max_steps=20)
    b.mkdir()

    class StopAt13(PretrainBatches):
        def micro_batch(self, index):
            if index == 12:  # step 13's micro-batch: after the best (step 10), before a worse evaluation
                (b / "STOP").touch()
            return super().micro_batch(index)

    stopped = train(b, tok, overfit_tokens, cls=StopAt13, max_steps=20)
    assert stopped["stopped"] and stopped["steps"] == 13 and (b / "STOP.done-13").is_file()
    best_step = config_json(a / "best")["steps"]
    assert best_step < 13 and config_json(b / "best")["steps"] == best_step
    state, _ = read_trainer_state(b / "checkpoints" / "step_00000013" / "trainer_state.json")
    assert state.best_step == best_step
    train(b, tok, overfit_tokens, seed=99, resume=True, max_steps=20)
    # the evaluations after the resume do not beat the best it remembers: best/ is a's, byte for byte
    assert (a / "best" / "model.safetensors").read_bytes() == (b / "best" / "model.safetensors").read_bytes()
    assert config_json(a / "best") == config_json(b / "best")
    assert evaluations(a) == evaluations(b)
    # a crash that leaves only a checkpoint from before the best: best/ is from past it, so it goes,
    # and the replayed evaluations write the same one again
    for ckpt in (b / "checkpoints").iterdir():
        if ckpt.name != "step_00000005":
            shutil.rmtree(ckpt)
    shutil.rmtree(b / "final")
    capsys.readouterr()
    train(b, tok, overfit_tokens, seed=5, resume=True, max_steps=20)
    assert f"removed {b / 'best'}: its step {best_step} is not this run's best so far (5)" in capsys.readouterr().err
    assert (a / "best" / "model.safetensors").read_bytes() == (b / "best" / "model.safetensors").read_bytes()


def test_a_best_model_with_a_non_finite_weight_is_rolled_back_never_written(tmp_path, tok, overfit_tokens):
    """A NaN in the input embedding of a token no batch holds leaves every loss finite: only the
    weight check before best/ sees it, and the run goes back to its checkpoint instead."""
    train_ids, val_ids = overfit_tokens
    unused = max(set(range(tok.vocab_size)) - set(train_ids.tolist()) - set(val_ids.tolist()))
    model = tiny_model(tok.vocab_size, 0, seq_len=32, tie_embeddings=False)

    class PoisonAtStep6(PretrainBatches):
        def micro_batch(self, index):
            if index == 5:  # step 6, after the checkpoint of step 5, before the evaluation of step 6
                with torch.no_grad():
                    model.embed_tokens.weight[unused] = float("nan")
            return super().micro_batch(index)

    summary = run_training(model, PoisonAtStep6(train_ids, 32, 4, seed=0, val_tokens=val_ids),
                           config(max_steps=12, eval_every=2), tmp_path, tok, {"stage": "t"})
    assert [(e["step"], e["to_step"], e["why"]) for e in summary["rollbacks"]] == [(6, 5, "a weight is not finite")]
    best = tmp_path / "best"
    assert all(torch.isfinite(t).all() for t in weights(best).values())
    assert config_json(best)["steps"] == summary["best"]["step"] and summary["steps"] == 12


def test_best_metric_names_a_measured_column_with_its_direction(tmp_path):
    from llm_maker.train.trainer import improves

    assert improves(3.0, 3.2, higher_is_better=False) and not improves(3.2, 3.2, higher_is_better=False)
    assert improves(0.4, 0.3, higher_is_better=True) and improves(0.1, None, True) and not improves(None, 1.0, True)
    recipe = recipe_from_dict({"sft": {"train": {"best_metric": "val_token_acc", "early_stop_patience": 3}}},
                              check_files=False)
    assert recipe.sft.train.best_metric == "val_token_acc" and recipe.sft.use == "best"
    with pytest.raises(RecipeError, match="`train.best_metric` is val_token_acc, SFT's held-out token accuracy"):
        recipe_from_dict({"train": {"best_metric": "val_token_acc"}}, check_files=False)
    with pytest.raises(RecipeError, match="`train.best_metric` is mc_acc, measured only with train.mc_eval"):
        recipe_from_dict({"train": {"best_metric": "mc_acc"}}, check_files=False)
    with pytest.raises(RecipeError, match="`sft.train.early_stop_patience` must be at least 1"):
        recipe_from_dict({"sft": {"train": {"early_stop_patience": 0}}}, check_files=False)
    with pytest.raises(RecipeError, match="`sft.use` must be"):
        recipe_from_dict({"sft": {"use": "last"}}, check_files=False)


# --------------------------------------------------------------------------------------
# The SFT stage: best/ by default, taken by eval, chat, the export card and the registry
# --------------------------------------------------------------------------------------

def sft_run(tmp_path: Path, tokenizer_dir: Path, pack_dir: Path, **sft) -> tuple:
    """A run with tokenizer/, pack/, pretrain/final (a tiny random model) and a recipe whose SFT
    learns 8 arithmetic answers by heart (so its held-out loss turns) on 8 held out."""
    paths = RunPaths.of(tmp_path / "run")
    shutil.copytree(tokenizer_dir, paths.tokenizer)
    shutil.copytree(pack_dir, paths.pack)
    tok = Tokenizer.load(paths.tokenizer)
    save_model_dir(paths.pretrain / "final", tiny_model(tok.vocab_size, 0, seq_len=64), tok, {"stage": "pretrain"})
    write_manifest(paths.pretrain, "pretrain", "prefp")
    convs = [c["messages"] for c in builtin_conversations() if c["kind"] == "arithmetic"][:16]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    train = dict(max_steps=30, micro_batch_size=4, lr=3e-2, warmup_steps=2, min_lr_ratio=1.0, weight_decay=0.0,
                 eval_every=EVAL_EVERY, eval_batches=2, checkpoint_every=10, log_every=5, progress=False,
                 device="cpu", precision="fp32")
    recipe = recipe_from_dict({
        "name": "best-demo", "run_dir": str(paths.root), "train": {"device": "cpu", "micro_batch_size": 2},
        "sft": {"data": {"source": str(data), "heldout_fraction": 0.5}, "train": train, **sft},
        "eval": {"prompts": ["What is 2 + 2?"], "max_new_tokens": 4, "max_heldout": 2, "val_batches": 1,
                 "precision": "fp32"}})
    return recipe, paths


def test_sft_keeps_best_by_default_and_eval_chat_and_cards_take_it(tmp_path, tokenizer_dir, pack_dir):
    from llm_maker.eval.evaluate import run_eval
    from llm_maker.export.card import model_card
    from llm_maker.registry.registry import write_card, write_registry
    from llm_maker.sft.stage import run_sft

    recipe, paths = sft_run(tmp_path, tokenizer_dir, pack_dir)
    assert not recipe.sft.train.keep_best  # sft.use: best keeps it all the same
    run_sft(recipe, paths)
    manifest = read_manifest(paths.sft)
    best = manifest["summary"]["best"]
    evals = evaluations(paths.sft)
    assert (best["step"], round(best["value"], 6)) == min(evals, key=lambda e: e[1])
    assert best["step"] < 30 and best["value"] < best["last_value"]  # the held-out loss turned: final/ is worse
    assert manifest["use"] == "best" and manifest["start_from"] == "final"
    best_dir = paths.sft / "best"
    assert (best_dir / "tokenizer_config.json").is_file()  # the chat template, as in final/
    # one place decides: RunPaths.model, and through it final_model and the CLI's --model
    assert paths.model("sft") == paths.final_model() == best_dir
    assert _model_dir(str(paths.root), None) == _model_dir(str(paths.root), "sft") == best_dir
    assert _model_dir(str(paths.root), "base") == paths.pretrain / "final"

    run_eval(recipe, paths)
    report = read_json(paths.eval / "report.json")
    assert report["models"]["sft"]["dir"] == str(best_dir) and report["models"]["sft"]["steps"] == best["step"]

    kept = (f"best: step {best['step']}, val loss {best['value']:.3f} "
            f"(final: step 30, {best['last_value']:.3f})")
    model, _, meta = load_model_dir(best_dir)
    assert f"- sft: {kept}." in model_card(best_dir, model, meta)  # the export's README.md
    assert f"- sft: {kept}." in write_card(paths.root).read_text()  # the run's card.md
    assert f"· {kept} |" in write_registry(tmp_path, cards=False).read_text()  # its REGISTRY.md row

    # sft.use: final changes no weight: the stage stays up to date and its record follows the recipe
    recipe.sft.use = "final"
    run_sft(recipe, paths)
    assert read_manifest(paths.sft)["use"] == "final" and paths.model("sft") == paths.final_model() == \
        paths.sft / "final"
    # sft.start_from: best needs pretraining's best/, which this run did not keep
    recipe.sft.start_from = "best"
    with pytest.raises(CheckpointError, match="no best pretraining model, but sft.start_from is best"):
        run_sft(recipe, paths)
