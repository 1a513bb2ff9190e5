"""eval/lm_eval_suite.py: local jsonl tasks run through lm-evaluation-harness offline on an export;
our native multiple-choice scores equal lm-eval's; the comparison table and win rates; the
`llm-maker lm-eval RUN_DIR --suite` verb and the plain `lm_eval --model hf` CLI on an export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_maker.cli import main
from llm_maker.errors import LLMMakerError
from llm_maker.eval.lm_eval_suite import comparison_table, go_offline, headline, resolve_suite, run_lm_eval, win_rate
from llm_maker.eval.multiple_choice import load_mc_items, score_items
from llm_maker.export.hf import export_hf
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import load_model_dir, save_model_dir

pytest.importorskip("lm_eval")
DATA = Path(__file__).parent / "data"
MC, CLOZE, TEXT = DATA / "python_mc.jsonl", DATA / "python_cloze.jsonl", DATA / "python_text.jsonl"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the Hub; monkeypatch restores the environment afterwards."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer_dir, prose_texts):
    """A run with a trained base model and a second, less trained one as its SFT stand-in."""
    from helpers import prose_tokens, train_tiny

    tok = Tokenizer.load(tokenizer_dir)
    tokens = prose_tokens(tok, prose_texts[:1200])
    root = tmp_path_factory.mktemp("lm") / "run"
    save_model_dir(root / "pretrain" / "final", train_tiny(tokens, tok, tie=True, steps=40), tok,
                   {"stage": "pretrain", "recipe": "tiny"})
    save_model_dir(root / "sft" / "final", train_tiny(tokens, tok, tie=True, steps=5, seed=3), tok,
                   {"stage": "sft", "recipe": "tiny"})
    return root


def test_resolve_suite_writes_task_yamls_for_local_files(tmp_path):
    suite = resolve_suite(f"{MC},{CLOZE},{TEXT}", tmp_path / "tasks")
    assert suite.tasks == ["llm_maker_python_mc", "llm_maker_python_cloze", "llm_maker_python_text"]
    assert suite.metrics == {"llm_maker_python_mc": "acc_norm", "llm_maker_python_cloze": "acc",
                             "llm_maker_python_text": "word_perplexity"}
    assert suite.local_only and suite.include_paths == [str(tmp_path / "tasks")]
    import yaml

    mc = yaml.safe_load((tmp_path / "tasks" / "llm_maker_python_mc.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and mc["dataset_kwargs"]["data_files"]["test"] == str(MC)
    seeds = resolve_suite("small-lm", tmp_path / "t2")
    assert seeds.tasks[:2] == ["hellaswag", "arc_easy"] and seeds.metrics["wikitext"] == "word_perplexity"
    assert not seeds.local_only
    assert resolve_suite(str(tmp_path / "tasks"), tmp_path / "t3").tasks == sorted(suite.tasks)  # a YAML dir


def test_resolve_suite_errors_name_the_item(tmp_path):
    with pytest.raises(LLMMakerError, match=r"--suite .*nope.jsonl: file not found"):
        resolve_suite(str(tmp_path / "nope.jsonl"), tmp_path)
    (tmp_path / "odd.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(LLMMakerError, match=r"odd.jsonl: rows need context/choices/label .* \['question'\]"):
        resolve_suite(str(tmp_path / "odd.jsonl"), tmp_path)
    with pytest.raises(LLMMakerError, match="names no task"):
        resolve_suite(" , ", tmp_path)


def test_table_and_win_rate():
    ours = {"a": {"metric": "acc_norm", "value": 0.5, "higher_is_better": True},
            "b": {"metric": "word_perplexity", "value": 80.0, "higher_is_better": False},
            "c": {"metric": "acc", "value": 0.2, "higher_is_better": True}}
    base = {"a": {**ours["a"], "value": 0.4}, "b": {**ours["b"], "value": 60.0}, "c": {**ours["c"], "value": 0.2}}
    assert win_rate(ours, base) == (1, 3)  # better on a; worse perplexity on b; a tie on c is no win
    table = comparison_table({"ours": ours, "base": base})
    assert "| a | acc_norm ↑ | 0.5000 | 0.4000 |" in table and "| b | word_perplexity ↓ | 80.00 | 60.00 |" in table
    assert table.strip().endswith("| **ours wins** | | — | 1/3 (33%) |")


@pytest.mark.slow
def test_native_scores_equal_lm_eval_on_the_same_task_and_model(tmp_path, run_dir):
    model_dir = run_dir / "pretrain" / "final"
    model, tok, _ = load_model_dir(model_dir)
    hf_dir = export_hf(model_dir, tmp_path / "hf")
    suite = resolve_suite(str(MC), tmp_path / "tasks")
    go_offline()
    results = run_lm_eval(hf_dir, suite, "cpu", batch_size=4, prefix_token_id=tok.eos_id, log_samples=True)
    items = load_mc_items(MC)
    native = score_items(model, tok, items, batch_size=16)
    theirs = results["results"]["llm_maker_python_mc"]
    assert results["n-samples"]["llm_maker_python_mc"]["effective"] == len(items) == 24
    assert abs(theirs["acc,none"] * 24 - native["correct"]) < 1e-6
    assert abs(theirs["acc_norm,none"] * 24 - native["correct_norm"]) < 1e-6
    assert 0 < native["correct"] < 24 or 0 < native["correct_norm"] < 24  # not a degenerate all/none
    # and item by item: the same log-likelihood for every choice (to float32 rounding)
    from llm_maker.eval.multiple_choice import TARGET_DELIMITER, encode_request, loglikelihoods

    for sample in results["samples"]["llm_maker_python_mc"]:
        item = items[sample["doc_id"]]
        reqs = [encode_request(tok, item.context, TARGET_DELIMITER + c, tok.eos_id) for c in item.choices]
        mine = loglikelihoods(model, reqs)
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(mine, abs=1e-4)
    assert headline(results, suite)["llm_maker_python_mc"]["metric"] == "acc_norm"


@pytest.mark.slow
def test_eval_suite_verb_writes_results_and_comparison(tmp_path, run_dir, capsys):
    out = tmp_path / "lm"
    argv = ["lm-eval", str(run_dir), "--suite", f"{MC},{CLOZE},{TEXT}", "--model", "base",
            "--baseline", f"early={run_dir / 'sft' / 'final'}", "--out", str(out), "--limit", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["columns"] == ["run/pretrain", "early"]
    ours, early = results["headline"]["run/pretrain"], results["headline"]["early"]
    assert set(ours) == {"llm_maker_python_mc", "llm_maker_python_cloze", "llm_maker_python_text"}
    assert 0 <= ours["llm_maker_python_mc"]["value"] <= 1 and ours["llm_maker_python_text"]["value"] > 1
    # 40 training steps beat 5 on held-out perplexity
    assert ours["llm_maker_python_text"]["value"] < early["llm_maker_python_text"]["value"]
    wins, n = win_rate(ours, early)
    assert f"| **run/pretrain wins** | | — | {wins}/{n} " in printed and n == 3
    assert (out / "table.md").read_text() == results["table"]
    assert results["models"]["run/pretrain"]["n_samples"]["llm_maker_python_mc"]["effective"] == 6
    assert main(argv) == 2  # results exist: not replaced without --force
    assert "pass --force" in capsys.readouterr().err
    assert main(["lm-eval", str(run_dir), "--suite", "no_such_task_xyz", "--out", str(tmp_path / "x")]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err


@pytest.mark.slow
def test_plain_lm_eval_cli_runs_on_an_export(tmp_path, run_dir):
    """`lm_eval --model hf --model_args pretrained=DIR`: nothing else about the model is needed."""
    hf_dir = export_hf(run_dir / "sft" / "final", tmp_path / "hf")
    suite = resolve_suite(str(MC), tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir}",
           "--tasks", suite.tasks[0], "--include_path", suite.include_paths[0], "--limit", "4",
           "--output_path", str(tmp_path / "res")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "llm_maker_python_mc" in proc.stdout and "acc_norm" in proc.stdout
    written = list((tmp_path / "res").rglob("results_*.json"))
    assert len(written) == 1
    assert json.loads(written[0].read_text())["results"]["llm_maker_python_mc"]["acc,none"] in (0, .25, .5, .75, 1)
