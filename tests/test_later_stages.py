"""The later stages (distill, dpo) through every consumer of a run directory: eval scores the DPO
model and takes the distilled model as the base; the registry, the run's card, the export card,
push, the summary and the CLI treat their models like any other. Runs are built as files (tiny
saved models, hand-written manifests and metrics.csv); no stage is trained here."""
from __future__ import annotations

import csv
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import make_tokenizer, successor_model, tiny_model, training_text
from llm_maker.artifacts import stage_fingerprint, write_manifest
from llm_maker.cli import _model_dir, main
from llm_maker.errors import LLMMakerError
from llm_maker.eval.evaluate import eval_fingerprint, run_eval, validation_loss
from llm_maker.export.card import card_facts, render_card, stage_figures
from llm_maker.export.push import hub_datasets
from llm_maker.layout import RunPaths
from llm_maker.model.llama import LlamaConfig, count_parameters
from llm_maker.recipe import Recipe
from llm_maker.registry.registry import run_status, scan_run, write_card, write_registry
from llm_maker.summary import summary_lines
from llm_maker.train.checkpoint import load_model_dir, save_model_dir
from llm_maker.train.trainer import METRICS_FIELDS


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def words(tok):
    (the,), (and_,) = tok.encode(" the"), tok.encode(" and")
    return the, and_


def user(text):
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------
# eval: the DPO model beside base and SFT, the distilled model as the base
# --------------------------------------------------------------------------------------

# Greedy stubs: base says " and" forever; SFT " the" then <|im_end|>; DPO " and" then <|im_end|>.
def base_stub(tok, words):
    return successor_model(tok.vocab_size, {}, default=words[1])


def sft_stub(tok, words):
    return successor_model(tok.vocab_size, {words[0]: tok.im_end_id}, default=words[0])


def dpo_stub(tok, words):
    return successor_model(tok.vocab_size, {words[1]: tok.im_end_id}, default=words[1])


HELDOUT = [("What word comes first?", "the"), ("And the other?", "and"), ("Anything else?", "no")]


def eval_run(tmp_path, tok, words, dpo: bool = True, distill: bool = False) -> RunPaths:
    """pack/, pretrain/, sft/ (with held-out items), and optionally dpo/ and distill/ (whose model
    says " the" forever, so the base's answers tell which model eval took)."""
    paths = RunPaths.of(tmp_path / "run")
    ids = np.array(tok.encode(" ".join(training_text(3000))), dtype=np.uint16)
    split = len(ids) * 3 // 4
    paths.pack.mkdir(parents=True)
    ids[:split].tofile(paths.pack / "train.bin")
    ids[split:].tofile(paths.pack / "val.bin")
    write_manifest(paths.pack, "pack", "pack-fp", dtype="uint16", vocab_size=tok.vocab_size, train_tokens=split,
                   val_tokens=len(ids) - split, tokenizer_hash=tok.hash)
    save_model_dir(paths.pretrain / "final", base_stub(tok, words), tok, {"stage": "pretrain"})
    write_manifest(paths.pretrain, "pretrain", "pretrain-fp", summary={"tokens_seen": 100, "steps": 1})
    save_model_dir(paths.sft / "final", sft_stub(tok, words), tok, {"stage": "sft", "chat_template": "chatml"})
    write_manifest(paths.sft, "sft", "sft-fp", summary={"tokens_seen": 10, "steps": 1})
    (paths.sft / "data").mkdir()
    (paths.sft / "data" / "heldout.jsonl").write_text("".join(
        json.dumps({"messages": user(q) + [{"role": "assistant", "content": a}]}) + "\n" for q, a in HELDOUT))
    if dpo:
        save_model_dir(paths.dpo / "final", dpo_stub(tok, words), tok,
                       {"stage": "dpo", "chat_template": "chatml", "tokens_seen": 77, "steps": 4})
        write_manifest(paths.dpo, "dpo", "dpo-fp", summary={"tokens_seen": 77, "steps": 4}, use="final")
    if distill:
        save_model_dir(paths.distill / "final", successor_model(tok.vocab_size, {}, default=words[0]), tok,
                       {"stage": "distill", "tokens_seen": 555, "steps": 5})
        write_manifest(paths.distill, "distill", "distill-fp", summary={"tokens_seen": 555, "steps": 5})
    return paths


def eval_recipe() -> Recipe:
    r = Recipe(name="later")
    r.train.device = "cpu"
    r.train.micro_batch_size = 2
    r.eval.prompts = ["What is a list?"]
    r.eval.max_new_tokens = 4
    r.eval.val_batches = 1
    r.eval.precision = "fp32"  # losses compared exactly with validation_loss on the fp32 stubs
    return r


def test_eval_scores_the_dpo_model_beside_base_and_sft(tok, words, tmp_path):
    paths = eval_run(tmp_path, tok, words)
    recipe = eval_recipe()
    recipe.dpo.enabled = True
    report = json.loads((run_eval(recipe, paths) / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft", "dpo"}
    assert report["models"]["dpo"]["stage"] == "dpo" and report["models"]["dpo"]["tokens_seen"] == 77
    assert report["models"]["dpo"]["dir"] == str(paths.dpo / "final")
    val = np.fromfile(paths.pack / "val.bin", dtype=np.uint16)
    assert report["validation"]["dpo"]["loss"] == pytest.approx(validation_loss(dpo_stub(tok, words), val, 64, 2, 1,
                                                                                "cpu"))
    assert report["validation"]["dpo"]["loss"] != pytest.approx(report["validation"]["sft"]["loss"])
    st = report["stop_table"]
    assert st["stop_fraction"] == {"base": 0.0, "sft": 1.0, "dpo": 1.0}
    assert all(r["dpo"] == {"text": " and", "stopped": True, "ended_document": False, "n_tokens": 1}
               for r in st["rows"])
    em = report["exact_match"]
    assert em["correct"] == {"base": 0, "sft": 1, "dpo": 1} and em["accuracy"]["dpo"] == pytest.approx(1 / 3)
    assert [e["dpo"] for e in em["examples"]] == ["and"] * 3
    md = (paths.eval / "report.md").read_text()
    assert "## Does it answer and stop? (base vs SFT vs DPO)" in md
    assert "| What is a list? | recipe | cut@4 and and and and | eos@1 the | eos@1 and |" in md
    assert "| dpo | 33% | 1/3 |" in md
    assert json.loads((paths.eval / "manifest.json").read_text())["models"]["dpo"] == str(paths.dpo / "final")


def test_eval_fingerprint_is_unchanged_without_the_later_stages(tok, words, tmp_path):
    paths = eval_run(tmp_path, tok, words, dpo=False)
    recipe = eval_recipe()
    # the formula before distill and dpo existed: a run that has neither keeps its eval
    assert eval_fingerprint(recipe, paths) == stage_fingerprint(recipe.eval, paths.pack, paths.pretrain, paths.sft)
    recipe.dpo.enabled = True  # enabled: dpo/'s fingerprint is an input, even before it has run
    enabled = eval_fingerprint(recipe, paths)
    assert enabled != stage_fingerprint(recipe.eval, paths.pack, paths.pretrain, paths.sft)
    write_manifest(paths.dpo, "dpo", "dpo-fp-2", summary={})
    assert eval_fingerprint(recipe, paths) != enabled  # a retrained DPO stage reruns eval
    distilled = Recipe()
    distilled.distill.enabled = True
    assert eval_fingerprint(distilled, paths) != eval_fingerprint(Recipe(), paths)


def test_eval_takes_the_distilled_model_as_the_base(tok, words, tmp_path):
    paths = eval_run(tmp_path, tok, words, dpo=False, distill=True)
    recipe = eval_recipe()
    recipe.distill.enabled = True
    report = json.loads((run_eval(recipe, paths) / "report.json").read_text())
    base = report["models"]["base"]
    assert base["stage"] == "distill" and base["dir"] == str(paths.distill / "final") and base["tokens_seen"] == 555
    assert "dpo" not in report["models"]  # no DPO model: the report has the shape it always had
    assert report["base_completions"][0]["greedy"] == " the" * 4  # the distilled stub's words, not pretrain's
    (paths.distill / "final" / "model.safetensors").unlink()
    with pytest.raises(LLMMakerError, match=r"distill/final: no finished base model; run the `distill` stage first"):
        run_eval(recipe, paths, force=True)


# --------------------------------------------------------------------------------------
# A finished distill -> sft -> dpo run as files: registry, run card, summary
# --------------------------------------------------------------------------------------

DIMS = LlamaConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seq_len=64).to_dict()
PARAMS = count_parameters(LlamaConfig(**DIMS))
TEACHER = {"dir": "/runs/teacher-run/pretrain/final", "hash": "abcdef0123456789", "mode": "cached", "k": 16,
           "T": 2.0, "alpha": 0.5, "precision": "auto"}  # distill/stage.py's record
RECIPE = {"name": "later", "train": {"max_steps": 40, "grad_clip": 1.0},
          "distill": {"enabled": True, "teacher": TEACHER["dir"], "student": "scratch",
                      "train": {"max_steps": 30, "eval_every": 10, "lr": 2e-3}},
          "sft": {"enabled": True, "train": {"max_steps": 20, "eval_every": 10}},
          "dpo": {"enabled": True, "beta": 0.1, "train": {"max_steps": 20, "eval_every": 10, "lr": 5e-6}}}
REPORT = {
    "models": {"base": {"dir": "x/distill/final", "stage": "distill", "parameters": PARAMS},
               "sft": {"dir": "x/sft/final", "stage": "sft", "parameters": PARAMS},
               "dpo": {"dir": "x/dpo/final", "stage": "dpo", "parameters": PARAMS}},
    "validation": {"base": {"loss": 3.8, "perplexity": math.exp(3.8)},
                   "sft": {"loss": 4.2, "perplexity": math.exp(4.2)},
                   "dpo": {"loss": 4.3, "perplexity": math.exp(4.3)}, "tokens_scored": 1000,
                   "unigram_loss": 6.0, "unigram_perplexity": math.exp(6.0)},
    "exact_match": {"accuracy": {"base": 0.0, "sft": 0.25, "dpo": 0.5}, "correct": {"base": 0, "sft": 2, "dpo": 4},
                    "n_items": 8},
    "stop_table": {"stop_fraction": {"base": 0.0, "sft": 0.5, "dpo": 1.0}, "max_new_tokens": 48,
                   "stop_token": "<|im_end|>", "rows": [
                       {"prompt": "What is a list?",
                        "base": {"text": "a list a list", "stopped": False, "n_tokens": 48},
                        "sft": {"text": "A sequence of", "stopped": False, "n_tokens": 48},
                        "dpo": {"text": "A sequence.", "stopped": True, "n_tokens": 4}}]},
    "base_completions": [{"prompt": "The tuple", "greedy": " is a sequence", "sampled": "x"}]}


def metrics_csv(stage_dir: Path, rows: list[dict]) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({"tokens": r["step"] * 1000, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 4000,
                        "peak_mem_mb": 100, "elapsed_s": r["step"], **r})


def distill_metrics(steps):
    # kl 1 - s/40 and ce 3.4 - s/100: 0.25 and 3.1 at step 30; val loss at every 10th step
    return [{"step": s, "loss": 3.0, "kl": round(1 - s / 40, 6), "ce": round(3.4 - s / 100, 6),
             "teacher_tokens_per_s": 9000, "val_loss": round(3.5 - s / 100, 6) if s % 10 == 0 else ""}
            for s in steps]


def dpo_metrics(steps):
    # train margin s/40, pref acc 0.5 + s/100; held out at steps 10 and 20: margin 0.2, 0.42; acc 0.6, 0.75
    held = {10: (0.2, 0.6), 20: (0.42, 0.75)}
    return [{"step": s, "loss": 0.6, "reward_margin": s / 40, "pref_acc": 0.5 + s / 100,
             "val_reward_margin": held.get(s, ("", ""))[0], "val_pref_acc": held.get(s, ("", ""))[1],
             "val_loss": 2.0 if s in held else ""} for s in steps]


def fake_model(directory: Path, stage: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model": DIMS, "stage": stage}))
    (directory / "model.safetensors").write_bytes(b"")


def later_run(root: Path, upto: str = "eval", name: str = "later") -> Path:
    """A run of data, tokenizer, pack, distill (from scratch: no pretrain), sft, dpo, eval, each
    finished up to and including `upto`."""
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "name": name}))
    stages = ["data", "tokenizer", "pack", "distill", "sft", "dpo", "eval"]
    for stage in stages[: stages.index(upto) + 1]:
        fields = {}
        if stage == "pack":
            fields = {"train_tokens": 90_000, "val_tokens": 5_000}
        if stage == "distill":
            metrics_csv(run / stage, distill_metrics(range(10, 31, 10)))
            fake_model(run / stage / "final", stage)
            fields = {"model": DIMS, "parameters": PARAMS, "teacher": TEACHER,
                      "summary": {"steps": 30, "tokens_seen": 30_000, "final_loss": 3.0, "val_loss": 3.2,
                                  "device": "cpu", "precision": "fp32"}}
        if stage == "sft":
            metrics_csv(run / stage, [{"step": s, "loss": 2.0} for s in range(5, 21, 5)])
            fake_model(run / stage / "final", stage)
            fields = {"summary": {"steps": 20, "tokens_seen": 8_000, "val_loss": 2.5}, "data": {"train": {"kept": 90}}}
        if stage == "dpo":
            metrics_csv(run / stage, dpo_metrics(range(5, 21, 5)))
            fake_model(run / stage / "final", stage)
            fields = {"summary": {"steps": 20, "tokens_seen": 4_000, "val_loss": 2.0, "final_loss": 0.6,
                                  "best": {"metric": "val_pref_acc", "value": 0.75, "step": 20}},
                      "beta": 0.1, "use": "final", "batch_seq_len": 48,
                      "data": {"train": {"kept": 120}, "heldout": {"kept": 14}}}
        if stage == "eval":
            (run / "eval").mkdir()
            (run / "eval" / "report.json").write_text(json.dumps(REPORT))
        write_manifest(run / stage, stage, "fp", **fields)
    return run


def test_run_status_knows_the_optional_later_stages(tmp_path):
    done = later_run(tmp_path)
    recipe = yaml.safe_load((done / "recipe.yaml").read_text())
    # distill from scratch replaces pretrain: 7 stages (data, tokenizer, pack, distill, sft, dpo, eval)
    assert run_status(RunPaths.of(done), recipe, now=1e12) == ("done", "all 7 stages finished")
    # switched off (or absent from the recipe: off by default), they are not waited for
    assert run_status(RunPaths.of(done), {**recipe, "dpo": {"enabled": False}}, now=1e12) == \
        ("done", "all 6 stages finished")
    assert run_status(RunPaths.of(done), {}, now=1e12)[0] == "paused"  # pretrain was never run
    paused = later_run(tmp_path, upto="sft", name="paused")
    metrics_csv(paused / "dpo", dpo_metrics([5, 10]))
    fake_model(paused / "dpo" / "checkpoints" / "step_00000010", "dpo")
    (paused / "dpo" / "checkpoints" / "step_00000010" / "trainer_state.json").write_text("{}")
    status, why = run_status(RunPaths.of(paused), recipe, now=1e12)
    assert status == "paused" and why.startswith("dpo step 10/20 (checkpoint); resume with")


def test_registry_rows_for_distilled_and_dpo_models(tmp_path):
    run = later_run(tmp_path / "runs")
    record = scan_run(run, now=1e12)
    assert [m.stage for m in record.models] == ["distill", "sft", "dpo"]
    distill, sft, dpo = record.models
    assert distill.scores == ["EM 0%", "stops 0%", "KL 0.250", "CE 3.100"]
    assert distill.val_loss == 3.8 and distill.note == "distilled from teacher-run/pretrain/final"
    assert dpo.scores == ["EM 50%", "stops 100%", "pref acc 75%", "margin 0.420"]
    assert dpo.val_loss == 2.0 and dpo.note == "120 preference pairs" and dpo.tokens == 4_000
    text = write_registry(tmp_path / "runs", cards=False, now=1e12).read_text()
    assert (f"| 1 | [later (distilled)](later/card.md) | {PARAMS:,} | 512 | 30k, distilled from teacher-run/"
            "pretrain/final | val 3.800 (44.7) | EM 0% · stops 0% · KL 0.250 · CE 3.100 | ✅ done |") in text
    assert (f"| 3 | [later (DPO)](later/card.md) | {PARAMS:,} | 512 | 4k, 120 preference pairs | resp. 2.000 (7.4) "
            "| EM 50% · stops 100% · pref acc 75% · margin 0.420 | ✅ done |") in text


def test_stage_figures_are_taken_at_the_kept_model():
    rows = dpo_metrics(range(5, 21, 5))
    manifest = {"summary": {"steps": 20, "best": {"metric": "val_pref_acc", "value": 0.6, "step": 10}}, "beta": 0.2,
                "data": {"train": {"kept": 50}}}
    final = stage_figures("dpo", manifest, rows)
    assert (final["val_pref_acc"], final["val_reward_margin"], final["pref_acc"]) == (0.75, 0.42, 0.7)
    best = stage_figures("dpo", manifest, rows, kept="best")  # best/ is the step-10 model
    assert (best["val_pref_acc"], best["val_reward_margin"], best["pref_acc"], best["reward_margin"]) == \
        (0.6, 0.2, 0.6, 0.25)
    assert best["beta"] == 0.2 and best["pairs"] == 50 and best["steps"] == 10
    d = stage_figures("distill", {"teacher": TEACHER}, distill_metrics([10, 20, 30]))
    assert (d["kl"], d["ce"], d["val_loss"], d["teacher"]["mode"]) == (0.25, 3.1, 3.2, "cached")
    with pytest.raises(ValueError, match="stage 'sft' has no figures"):
        stage_figures("sft", {}, [])


def test_run_card_has_distill_and_dpo_sections_and_curves(tmp_path):
    run = later_run(tmp_path)
    text = write_card(run).read_text()
    assert ("A 106,816-parameter Llama-style decoder trained from scratch by llm-maker on 30k tokens, distilled "
            "from `teacher-run/pretrain/final`, then instruction-tuned (chatml template, 90 SFT conversations), "
            "then preference-tuned with DPO (β 0.1, 120 preference pairs).") in text
    assert "## Distillation" in text and "## Preference tuning (DPO)" in text
    for row in ("| teacher | `teacher-run/pretrain/final` (weights abcdef012345) |",
                "| teacher's distribution | cached, top 16 log-probs per token |",
                "| final KL to the teacher | 0.250 |", "| final cross-entropy | 3.100 |",
                "| preference pairs | 120 (+ 14 held out) |", "| β | 0.1 |",
                "| held-out preference accuracy | 75.0% |", "| held-out reward margin | 0.420 |",
                "| train preference accuracy | 70.0% |"):
        assert row in text, row
    # each stage's settings from its own recipe section
    assert "**Distillation (KL to the teacher + cross-entropy)**" in text and "| steps | 30 |" in text
    assert "**DPO (preference pairs against a frozen reference)**" in text
    assert "| learning rate | 5e-06 peak" in text and "| learning rate | 0.002 peak" in text
    assert "| batch | 4 × 1 accumulation × 48 tokens = 192 tokens/step |" in text  # DPO's defaults, padded to 48
    assert "| dpo | 100% | 50.0% of 8 |" in text and "| dpo | 4.300 | 73.7 |" in text
    assert "| What is a list? | no stop a list a list | no stop A sequence of | eos@4 A sequence. |" in text
    for name in ("distill_kl_ce", "reward_margin", "preference_accuracy"):
        png = run / "plots" / f"{name}.png"
        assert f"![{name}](plots/{name}.png)" in text
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert not (run / "plots" / "token_accuracy.png").exists()  # this SFT logged no token accuracy


def test_summary_shows_the_later_stages_key_figures(tmp_path):
    paths = RunPaths.of(later_run(tmp_path))
    lines = summary_lines(paths)
    text = "\n".join(lines)
    assert "Pretraining:" not in text  # distilled from scratch: no pretraining ran
    assert "  teacher teacher-run/pretrain/final (cached, alpha 0.5, T 2.0)   steps 30   tokens seen 30,000" in lines
    assert "  val loss 3.200 (ppl 24.5)   KL to the teacher 0.250   cross-entropy 3.100" in lines
    assert "  120 preference pairs, beta 0.1   steps 20   kept: final/" in lines
    assert "  held-out preference accuracy 75.0%   reward margin 0.420   (train: 70.0%, 0.500)" in lines
    assert "base 0%, SFT 50%, DPO 100%" in text and "base 0.0%, SFT 25.0%, DPO 50.0%" in text
    assert any(line.startswith("  distill ") and line.endswith("(done)") for line in lines)
    assert any(line.startswith("  pretrain ") and line.endswith("(skipped: distilled from scratch)") for line in lines)
    assert "     DPO : 'A sequence.'  [eos@4]" in lines
    # a run without them lists neither stage
    plain = RunPaths.of(tmp_path / "plain")
    assert not any(line.split()[0] in ("distill", "dpo") for line in summary_lines(plain)[2:9])


# --------------------------------------------------------------------------------------
# CLI: --model, the stage verbs
# --------------------------------------------------------------------------------------

def test_model_names_resolve_to_the_later_stages_models(tmp_path):
    run = later_run(tmp_path)
    assert _model_dir(str(run), "dpo") == run / "dpo" / "final"
    assert _model_dir(str(run), "distill") == run / "distill" / "final"
    assert _model_dir(str(run), "base") == run / "distill" / "final"  # a finished distill stage is the base
    assert _model_dir(str(run), None) == run / "dpo" / "final"  # the newest model
    fake_model(run / "dpo" / "best", "dpo")
    write_manifest(run / "dpo", "dpo", "fp", summary={}, use="best")  # dpo.use: best
    assert _model_dir(str(run), "dpo") == run / "dpo" / "best"
    plain = tmp_path / "plain"
    fake_model(plain / "pretrain" / "final", "pretrain")
    assert _model_dir(str(plain), "base") == plain / "pretrain" / "final"


def test_help_lists_the_distill_and_dpo_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "distill             train the model against a teacher's distribution" in out
    assert "dpo                 tune the SFT model on preference pairs (DPO)" in out
    for verb in ("distill", "dpo"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--resume" in capsys.readouterr().out


def test_stage_verbs_route_to_run_stage(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("llm_maker.pipeline")  # the CLI imports the pipeline when a verb runs
    fake.run_stage = lambda name, recipe, resume=False, force=False: calls.append((name, recipe.name, resume, force))
    monkeypatch.setitem(sys.modules, "llm_maker.pipeline", fake)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "routed", "run_dir": str(tmp_path / "run")}))
    assert main(["distill", str(recipe), "--resume"]) == 0
    assert main(["dpo", str(recipe), "--force"]) == 0
    assert calls == [("distill", "routed", True, False), ("dpo", "routed", False, True)]


def test_the_pipeline_runs_distill_and_dpo_through_their_stage_functions():
    from llm_maker import pipeline
    from llm_maker.distill.stage import run_distill
    from llm_maker.dpo.stage import run_dpo

    assert pipeline.STAGE_BY_NAME["distill"].run is run_distill and pipeline.STAGE_BY_NAME["dpo"].run is run_dpo
    recipe = Recipe()
    assert not pipeline.STAGE_BY_NAME["dpo"].enabled(recipe)
    recipe.dpo.enabled = recipe.distill.enabled = True
    assert pipeline.STAGE_BY_NAME["dpo"].enabled(recipe) and not pipeline.STAGE_BY_NAME["pretrain"].enabled(recipe)


# --------------------------------------------------------------------------------------
# The export card and push
# --------------------------------------------------------------------------------------

@pytest.fixture
def model_run(tmp_path, tok):
    """Real tiny models: distill/final (the base), sft/final, dpo/final; manifests, metrics, eval report."""
    run = later_run(tmp_path, upto="tokenizer")
    for stage, seed in (("distill", 0), ("sft", 1), ("dpo", 2)):
        meta = {"stage": stage, "recipe": "later"} | ({"chat_template": "chatml"} if stage != "distill" else {})
        save_model_dir(run / stage / "final", tiny_model(tok.vocab_size, seed=seed), tok, meta)
    metrics_csv(run / "distill", distill_metrics(range(10, 31, 10)))
    metrics_csv(run / "sft", [{"step": s, "loss": 2.0} for s in range(5, 21, 5)])
    metrics_csv(run / "dpo", dpo_metrics(range(5, 21, 5)))
    write_manifest(run / "distill", "distill", "fp", teacher=TEACHER, summary={"steps": 30, "tokens_seen": 30_000})
    write_manifest(run / "sft", "sft", "fp", summary={"steps": 20, "tokens_seen": 8_000})
    write_manifest(run / "dpo", "dpo", "fp", beta=0.1, use="final", data={"train": {"kept": 120}},
                   summary={"steps": 20, "tokens_seen": 4_000})
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps(REPORT))
    return run


def test_export_cards_of_distilled_and_dpo_models(model_run):
    card = render_card(card_facts(model_run / "distill" / "final", *_model_and_meta(model_run / "distill" / "final")))
    assert "Llama-style decoder, base (distilled from `teacher-run/pretrain/final`), built with llm-maker" in card
    assert "## Distillation" in card and "## Preference tuning (DPO)" not in card
    assert "A base model: it continues text; it has no chat template." in card
    assert "| distill | 30 | 30,000 |" in card and "\n- distillation\n" in card
    card = render_card(card_facts(model_run / "dpo" / "final", *_model_and_meta(model_run / "dpo" / "final")))
    assert "decoder, instruction-tuned (SFT), then preference-tuned (DPO), built with llm-maker" in card
    assert "Its base model was distilled from `teacher-run/pretrain/final`." in card
    assert [line.split(" | ")[0] for line in card.splitlines() if line.startswith("| distill |")
            or line.startswith("| sft |") or line.startswith("| dpo |")][:3] == ["| distill", "| sft", "| dpo"]
    assert "## Preference tuning (DPO)" in card and "| held-out preference accuracy | 75.0% |" in card
    assert "apply_chat_template" in card and "**DPO (preference pairs against a frozen reference)**" in card


def _model_and_meta(model_dir):
    model, _, meta = load_model_dir(model_dir)
    return model, meta


def test_a_dpo_model_was_trained_on_the_sft_and_preference_sets():
    recipe = {"data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]},
              "sft": {"data": {"source": "hf:HuggingFaceTB/smoltalk:all"}},
              "dpo": {"data": {"source": "hf:HuggingFaceH4/ultrafeedback_binarized"}}}
    assert hub_datasets(recipe, "dpo") == ["HuggingFaceTB/smoltalk", "HuggingFaceH4/ultrafeedback_binarized"]
    assert hub_datasets(recipe, "sft") == ["HuggingFaceTB/smoltalk"] and hub_datasets(recipe, "distill") == []


def test_a_dpo_models_hub_base_model_is_found_through_its_sft_model(tmp_path):
    from llm_maker.export.push import base_model_of
    from llm_maker.train.checkpoint import ModelMeta

    run = tmp_path / "run"
    hub_dir = "/h/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/abc"
    links = {"pretrain": {"imported_from": hub_dir}, "sft": {"base_model": str(run / "pretrain" / "final")},
             "dpo": {"base_model": str(run / "sft" / "final")}}
    for stage, meta in links.items():
        (run / stage / "final").mkdir(parents=True)
        (run / stage / "final" / "config.json").write_text(json.dumps({"model": DIMS, "stage": stage, **meta}))
    dpo_meta = ModelMeta(stage="dpo", base_model=str(run / "sft" / "final"))
    assert base_model_of(run / "dpo" / "final", dpo_meta, None) == "HuggingFaceTB/SmolLM2-135M"
    assert base_model_of(run / "dpo" / "final", ModelMeta(stage="dpo"), None) == "HuggingFaceTB/SmolLM2-135M"
    assert base_model_of(run / "dpo" / "final", dpo_meta, "alice/base") == "alice/base"


def test_push_dry_run_of_a_dpo_model_says_it_is_a_chat_model(model_run, capsys):
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("transformers")
    assert main(["push", str(model_run), "--model", "dpo", "--repo", "alice/tiny-dpo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "the model: a chat model (chatml template), instruction-tuned (SFT), then preference-tuned (DPO)" in out
    header = yaml.safe_load(out.split("README.md header:\n---\n")[1].split("\n---")[0])
    assert {"sft", "chat", "dpo"} <= set(header["tags"])
    results = header["model-index"][0]["results"]
    assert {r["metrics"][0]["type"]: r["metrics"][0]["value"] for r in results}["loss"] == 4.3  # DPO's own loss
    for name in ("plots/reward_margin.png", "plots/preference_accuracy.png", "plots/distill_kl_ce.png"):
        assert any(line.strip().startswith(name + " ") for line in out.splitlines()), name
    assert main(["push", str(model_run), "--model", "distill", "--repo", "alice/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "the model: a base model, distilled from `teacher-run/pretrain/final`" in out
    assert "distillation" in yaml.safe_load(out.split("README.md header:\n---\n")[1].split("\n---")[0])["tags"]
