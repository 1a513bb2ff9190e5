"""The pipeline end to end on a small corpus: SIGKILL and resume, skip when unchanged,
bad input that leaves earlier artifacts intact."""
import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llm_maker.cli import main
from llm_maker.stopping import EXIT_STOPPED

pytestmark = pytest.mark.slow  # whole-pipeline runs in subprocesses, killed and resumed

RECIPE = {
    "name": "t",
    "data": {"sources": [{"type": "jsonl", "path": None}], "val_fraction": 0.1, "selection_key": "test"},
    "tokenizer": {"vocab_size": 512},
    "model": {"preset": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 128,
              "seq_len": 64},
    "train": {"max_steps": 200, "micro_batch_size": 4, "checkpoint_every": 10, "eval_every": 50,
              "eval_batches": 2, "log_every": 10, "lr": 3e-3, "warmup_steps": 10, "progress": False},
    "sft": {"data": {"max_conversations": 200},
            "train": {"max_steps": 10, "micro_batch_size": 8, "eval_every": 5, "eval_batches": 1,
                      "checkpoint_every": 5, "log_every": 5, "warmup_steps": 2, "progress": False}},
    "eval": {"max_new_tokens": 8, "max_heldout": 5, "val_batches": 2, "prompts": ["Hello"]},
}


def make_recipe(tmp_path: Path, corpus: Path, run_dir: Path, **changes) -> Path:
    r = yaml.safe_load(yaml.safe_dump(RECIPE))
    r["data"]["sources"][0]["path"] = str(corpus)
    r["run_dir"] = str(run_dir)
    for dotted, value in changes.items():
        node = r
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    p = tmp_path / f"recipe-{run_dir.name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, prose_jsonl):
    """data/tokenizer/pack built once; tests copy the run dir."""
    tmp = tmp_path_factory.mktemp("prepared")
    recipe = make_recipe(tmp, prose_jsonl, tmp / "run")
    assert main(["pipeline", str(recipe), "--only", "data", "tokenizer", "pack"]) == 0
    return tmp / "run"


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llm_maker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def last_loss(stage_dir: Path) -> float:
    with open(stage_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["step"] == "200"
    return float(rows[-1]["loss"])


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, prose_jsonl, prepared):
    runs = {}
    for name in ("a", "b"):
        shutil.copytree(prepared, tmp_path / name)
        runs[name] = make_recipe(tmp_path, prose_jsonl, tmp_path / name)
    full = cli("pretrain", str(runs["a"]))
    assert full.wait(timeout=300) == 0, full.stdout.read()

    ckpts = tmp_path / "b" / "pretrain" / "checkpoints"
    victim = cli("pretrain", str(runs["b"]))
    deadline = time.time() + 120
    while not (ckpts / "step_00000020").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b" / "pretrain" / "final").exists()
    # Leave the debris of a checkpoint cut off mid-write; resume must not choose it.
    partial = ckpts / ".tmp-step_00000990-x"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 10)

    resumed = cli("pretrain", str(runs["b"]), "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert last_loss(tmp_path / "b" / "pretrain") == pytest.approx(last_loss(tmp_path / "a" / "pretrain"), abs=1e-5)


def test_sigterm_saves_and_exits_cleanly(tmp_path, prose_jsonl, prepared):
    shutil.copytree(prepared, tmp_path / "c")
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "c", **{"train.max_steps": 5000})
    ckpts = tmp_path / "c" / "pretrain" / "checkpoints"
    proc = cli("pretrain", str(recipe))
    deadline = time.time() + 120
    while not (ckpts / "step_00000010").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_STOPPED
    steps = sorted(int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert steps[-1] > 10 and not (tmp_path / "c" / "pretrain" / "final").exists()
    out = proc.stdout.read()
    assert (f"pretrain stopped at step {steps[-1]} by SIGTERM (checkpoint step_{steps[-1]:08d}); "
            f"continue with: llm-maker pretrain {recipe} --resume") in out


# --------------------------------------------------------------------------------------
# Honest exits: a stop is not a finish and not a failure
# --------------------------------------------------------------------------------------

def stop_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llm_maker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)


def test_sigint_stops_at_a_checkpoint_with_its_own_exit_code(tmp_path, prose_jsonl, prepared):
    shutil.copytree(prepared, tmp_path / "i")
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "i", **{"train.max_steps": 5000})
    ckpts = tmp_path / "i" / "pretrain" / "checkpoints"
    proc = stop_cli("pretrain", str(recipe))
    wait_for(ckpts / "step_00000010", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED
    step = max(int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert err.strip().splitlines()[-1] == (f"llm-maker: pretrain stopped at step {step} by SIGINT (checkpoint "
                                            f"step_{step:08d}); continue with: llm-maker pretrain {recipe} --resume")


def test_stop_file_is_consumed_and_resume_goes_on(tmp_path, prose_jsonl, prepared, capsys):
    shutil.copytree(prepared, tmp_path / "s")
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "s", **{"train.max_steps": 30})
    stage = tmp_path / "s" / "pretrain"
    stage.mkdir()
    (stage / "STOP").touch()  # obeyed after the first step
    assert main(["pretrain", str(recipe)]) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert "pretrain stopped at step 1 by STOP file" in err and "--resume" in err
    assert not (stage / "STOP").exists() and (stage / "STOP.done-1").is_file()
    assert main(["pretrain", str(recipe), "--resume"]) == 0  # not stopped again by the same file
    assert (stage / "final").is_dir()


def test_resume_with_a_stop_file_present_says_so(tmp_path, prose_jsonl, prepared, capsys):
    shutil.copytree(prepared, tmp_path / "r")
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "r", **{"train.max_steps": 30})
    root = tmp_path / "r"
    (root / "STOP").touch()  # the run root's STOP stops every stage
    assert main(["pretrain", str(recipe), "--resume"]) == EXIT_STOPPED
    err = capsys.readouterr().err
    assert f"note: {root / 'STOP'} is present: this run stops after its first step" in err
    assert (root / "STOP.done-1").is_file()


def test_pipeline_stops_with_the_stage_and_says_how_to_go_on(tmp_path, prose_jsonl, prepared, capsys):
    shutil.copytree(prepared, tmp_path / "p")
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "p", **{"train.max_steps": 30})
    (tmp_path / "p" / "STOP").touch()
    assert main(["pipeline", str(recipe)]) == EXIT_STOPPED
    captured = capsys.readouterr()
    assert "[pretrain] pretrain stopped at step 1 by STOP file" in captured.out
    assert "[sft]" not in captured.out and "Chat with it" not in captured.out  # no summary of a stopped run
    assert f"continue with: llm-maker pipeline {recipe}" in captured.err
    assert main(["pipeline", str(recipe)]) == 0  # goes on from the checkpoint to the end


def test_an_early_sigterm_ends_cleanly(tmp_path, prose_jsonl):
    """SIGTERM while the data stage runs, before any training: the pipeline ends after that stage
    with the stop exit code, not killed by the signal."""
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "e")
    proc = stop_cli("pipeline", str(recipe))
    deadline = time.time() + 60
    line = ""
    while "[data] ..." not in line:  # printed after the handlers are in place
        line = proc.stdout.readline()
        assert line and time.time() < deadline, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err
    assert "received; run the same command again" in out and "continue with: llm-maker pipeline" in err


def test_pipeline_runs_then_skips_everything(tmp_path, prose_jsonl, prepared, capsys):
    shutil.copytree(prepared, tmp_path / "d")
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "d", **{"train.max_steps": 30})
    assert main(["pipeline", str(recipe)]) == 0
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "eval"):
        assert f"[{stage}] done" in out
    assert (tmp_path / "d" / "eval" / "report.json").is_file()
    assert main(["pipeline", str(recipe)]) == 0
    out = capsys.readouterr().out
    for stage in ("data", "tokenizer", "pack", "pretrain", "sft", "eval"):
        assert f"[{stage}] up to date, skipped" in out
    assert "unigram baseline" in out and "Chat with it" in out  # the summary
    assert main(["generate", str(tmp_path / "d"), "--model", "base", "--prompt", "The", "--temperature", "0",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_changed_config_does_not_silently_resume(tmp_path, prose_jsonl, prepared, capsys):
    shutil.copytree(prepared, tmp_path / "e")
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "e", **{"train.max_steps": 10})
    assert main(["pretrain", str(recipe)]) == 0
    changed = make_recipe(tmp_path, prose_jsonl, tmp_path / "e", **{"train.max_steps": 10, "train.lr": 1e-3})
    assert main(["pipeline", str(changed), "--only", "pretrain"]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b"", "no documents left"),
    (b"caf\xe9 au lait, not UTF-8", "UTF-8"),
])
def test_bad_corpus_is_a_clear_error_and_keeps_earlier_artifacts(tmp_path, prose_jsonl, prepared, capsys,
                                                                   content, message):
    shutil.copytree(prepared, tmp_path / "f")
    before = (tmp_path / "f" / "data" / "train.jsonl").read_bytes()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "f")
    r = yaml.safe_load(recipe.read_text())
    r["data"]["sources"] = [{"type": "text", "path": str(bad)}]
    recipe.write_text(yaml.safe_dump(r))
    assert main(["pipeline", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower() and "bad.txt" in err
    assert (tmp_path / "f" / "data" / "train.jsonl").read_bytes() == before
    assert (tmp_path / "f" / "pack" / "train.bin").is_file()


def test_resume_lets_bookkeeping_change_and_names_what_may_not(tmp_path, prose_jsonl, prepared, capsys):
    shutil.copytree(prepared, tmp_path / "k")
    recipe = make_recipe(tmp_path, prose_jsonl, tmp_path / "k", **{"train.max_steps": 30})
    (tmp_path / "k" / "STOP").touch()
    assert main(["pretrain", str(recipe)]) == EXIT_STOPPED
    capsys.readouterr()
    assert main(["pretrain", str(recipe), "--resume", "--set", "train.lr=0.001"]) == 2  # changes the weights
    err = capsys.readouterr().err
    assert "step_00000001 was written with another model/train config or other data" in err
    assert "(changed: config.train.lr: 0.003 -> 0.001)" in err and "--force" in err
    assert main(["pretrain", str(recipe), "--resume", "--set", "train.keep_checkpoints=1",
                 "--set", "train.log_every=5"]) == 0
    out = capsys.readouterr().out
    assert ("resuming from step_00000001 with changed settings that change no result: "
            "keep_checkpoints: 2 -> 1; log_every: 10 -> 5") in out
    assert (tmp_path / "k" / "pretrain" / "final").is_dir()
    assert len(list((tmp_path / "k" / "pretrain" / "checkpoints").glob("step_*"))) == 1  # the new keep
