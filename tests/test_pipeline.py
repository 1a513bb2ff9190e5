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
    assert proc.wait(timeout=60) == 0
    steps = sorted(int(p.name[5:]) for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert steps[-1] > 10 and not (tmp_path / "c" / "pretrain" / "final").exists()


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
