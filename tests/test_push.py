"""export/push.py: `llm-maker push` stages an export, a Hub-valid model card, the training curves and
(with --gguf) the GGUF as one commit. No test touches the network: the dry run makes no Hub call,
and the upload is checked by replacing `send`, or by handing `send` a recording stand-in for HfApi."""
from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from helpers import tiny_model
from llm_maker.cli import main
from llm_maker.errors import LLMMakerError
from llm_maker.export import push as push_mod
from llm_maker.export.push import check_repo_id, hub_datasets, hub_id_of_path, push, send, stage_push
from llm_maker.stopping import EXIT_ERROR
from llm_maker.tokenizer.tokenizer import Tokenizer
from llm_maker.train.checkpoint import save_model_dir
from llm_maker.train.trainer import METRICS_FIELDS

hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("transformers")

RECIPE = {"name": "tiny", "data": {"sources": [{"type": "fineweb-edu", "max_files": 1}]},
          "train": {"max_steps": 20, "eval_every": 10, "grad_clip": 1.0},
          "sft": {"data": {"source": "hf:HuggingFaceTB/smoltalk:all"}, "train": {"max_steps": 10, "eval_every": 5}}}
REPORT = {"validation": {"base": {"loss": 3.8, "perplexity": math.exp(3.8)},
                         "sft": {"loss": 4.1, "perplexity": math.exp(4.1)}, "tokens_scored": 1000}}
LM_EVAL = {"lm_eval_version": "0.4.9", "columns": ["run/sft"], "table": "| task |\n",
           "headline": {"run/sft": {"hellaswag": {"metric": "acc_norm", "value": 0.2871, "higher_is_better": True}}}}
BASE_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "README.md"}


def write_metrics(stage_dir, steps):
    with open(stage_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
        w.writeheader()
        for s in steps:
            w.writerow({"step": s, "tokens": s * 64, "loss": 5.0 - s / 10, "val_loss": 4.5 if s % 10 == 0 else "",
                        "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100, "peak_mem_mb": 1, "elapsed_s": s})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
    """A finished run (untrained tiny weights): base and SFT models, metrics, eval and lm-eval results."""
    tok = Tokenizer.load(tokenizer_dir)
    root = tmp_path_factory.mktemp("push") / "run"
    save_model_dir(root / "pretrain" / "final", tiny_model(tok.vocab_size), tok,
                   {"stage": "pretrain", "recipe": "tiny"})
    save_model_dir(root / "sft" / "final", tiny_model(tok.vocab_size, seed=1), tok,
                   {"stage": "sft", "recipe": "tiny", "chat_template": "chatml"})
    write_metrics(root / "pretrain", range(1, 21))
    write_metrics(root / "sft", range(1, 11))
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (root / "eval" / "lm_eval").mkdir(parents=True)
    (root / "eval" / "report.json").write_text(json.dumps(REPORT))
    (root / "eval" / "lm_eval" / "results.json").write_text(json.dumps(LM_EVAL))
    return root


def header_of(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def test_repo_ids_and_datasets():
    assert check_repo_id("alice/tiny-llama.v2") == "alice/tiny-llama.v2"
    for bad in ["tiny", "a/b/c", "/x", "a/", "a/b..c", "a b/c", ""]:
        with pytest.raises(LLMMakerError, match="OWNER/NAME"):
            check_repo_id(bad)
    assert hub_datasets(RECIPE, "pretrain") == ["HuggingFaceFW/fineweb-edu"]
    assert hub_datasets(RECIPE, "sft") == ["HuggingFaceFW/fineweb-edu", "HuggingFaceTB/smoltalk"]
    assert hub_datasets({"data": {"sources": [{"type": "jsonl", "path": "x.jsonl"}]}}, "pretrain") == []
    assert hub_id_of_path("/h/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/abc") == \
        "HuggingFaceTB/SmolLM2-135M"
    assert hub_id_of_path("/data/my-model") is None


def test_dry_run_prints_files_sizes_and_header_and_calls_no_hub(run, capsys, monkeypatch):
    def no_hub(*a, **k):
        raise AssertionError("a dry run must not call the Hub")
    monkeypatch.setattr(hub, "HfApi", no_hub)
    monkeypatch.setattr(push_mod, "send", no_hub)
    assert main(["push", str(run), "--repo", "alice/tiny", "--dry-run", "--gguf"]) == 0
    out = capsys.readouterr().out
    assert "would commit" in out and "alice/tiny" in out
    for name in [*BASE_FILES, "plots/loss.png", "plots/lr.png", "tiny-f16.gguf"]:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert line.rstrip().endswith(("B", "KB", "MB")), line
    header = yaml.safe_load(out.split("README.md header:\n---\n")[1].split("\n---")[0])
    assert header["license"] == "apache-2.0" and header["pipeline_tag"] == "text-generation"
    assert header["datasets"] == ["HuggingFaceFW/fineweb-edu", "HuggingFaceTB/smoltalk"]  # the SFT model (newest)
    assert "gguf" in header["tags"] and "llm-maker" in header["tags"]


def test_card_header_validates_with_huggingface_hub(run, tmp_path):
    staged = stage_push(run / "sft" / "final", "alice/tiny-chat", tmp_path, license="mit",
                        base_model="alice/tiny-base")
    card = hub.ModelCard(staged.card)
    data = card.data
    assert data.license == "mit" and data.language == ["en"] and data.library_name == "transformers"
    assert data.base_model == "alice/tiny-base" and data.pipeline_tag == "text-generation"
    assert {"llm-maker", "llama", "sft", "chat"} <= set(data.tags)
    name, results = hub.repocard_data.model_index_to_eval_results(header_of(staged.card)["model-index"])
    assert name == "tiny-chat"
    by_metric = {r.metric_type: r for r in results}
    assert by_metric["loss"].metric_value == pytest.approx(4.1)  # the SFT model's own validation loss
    assert by_metric["perplexity"].metric_value == pytest.approx(math.exp(4.1), abs=1e-3)
    assert by_metric["loss"].dataset_type == "HuggingFaceFW/fineweb-edu"
    assert by_metric["acc_norm"].dataset_type == "Rowan/hellaswag" and by_metric["acc_norm"].metric_value == 0.2871
    # round trip: the card re-rendered by huggingface_hub parses to the same metadata
    assert hub.ModelCard(str(card)).data.to_dict() == data.to_dict()
    # the body is the export's card, and links the curves it ships
    assert "## Architecture" in staged.card and "![loss](plots/loss.png)" in staged.card
    assert staged.card.splitlines().count("---") == 2  # one front matter: the export card's own is replaced
    assert (tmp_path / "hf" / "README.md").read_text(encoding="utf-8") == staged.card


def test_base_model_card_has_base_numbers_and_no_lm_eval_of_another_model(run, tmp_path):
    staged = stage_push(run / "pretrain" / "final", "alice/tiny", tmp_path)
    data = hub.ModelCard(staged.card).data
    assert data.base_model is None and data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert {r.metric_type: r.metric_value for r in data.eval_results} == {"loss": 3.8,
                                                                          "perplexity": round(math.exp(3.8), 4)}


def test_upload_is_one_commit_of_every_file(run, monkeypatch, capsys):
    calls = []

    def fake_send(api, repo_id, operations, message, private):
        calls.append(dict(api=api, repo_id=repo_id, operations=operations, message=message, private=private))
        for op in operations:  # the files still exist while sending
            assert op.path_or_fileobj and open(op.path_or_fileobj, "rb").read(1)
        return type("Info", (), {"commit_url": "https://huggingface.co/alice/tiny/commit/abc"})(), ["old.bin"]

    monkeypatch.setattr(push_mod, "send", fake_send)
    monkeypatch.setattr(hub, "HfApi", lambda: "api")
    assert main(["push", str(run), "--repo", "alice/tiny", "--gguf", "--private", "--message", "first"]) == 0
    assert len(calls) == 1
    call = calls[0]
    assert call["repo_id"] == "alice/tiny" and call["private"] is True and call["message"] == "first"
    assert all(isinstance(op, hub.CommitOperationAdd) for op in call["operations"])
    names = {op.path_in_repo for op in call["operations"]}
    assert BASE_FILES | {"plots/loss.png", "plots/lr.png", "plots/grad_norm.png", "tiny-f16.gguf"} <= names
    assert {n for n in names if not n.startswith("plots/")} == BASE_FILES | {"tiny-f16.gguf"}
    out = capsys.readouterr().out
    assert "commit/abc" in out and "old.bin" in out


def test_send_creates_the_repo_then_one_commit_and_deletes_nothing():
    class RecordingApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))

        def list_repo_files(self, repo_id):
            return [".gitattributes", "README.md", "stale.gguf"]

        def create_commit(self, repo_id, **kw):
            self.calls.append(("create_commit", repo_id, kw))
            return "info"

    api = RecordingApi()
    ops = [hub.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=b"hi")]
    assert send(api, "alice/tiny", ops, "msg", private=False) == ("info", ["stale.gguf"])
    assert api.calls == [("create_repo", "alice/tiny", {"private": False, "exist_ok": True}),
                         ("create_commit", "alice/tiny", {"operations": ops, "commit_message": "msg"})]


def test_bad_input_is_refused_before_any_export(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(push_mod, "stage_push", lambda *a, **k: pytest.fail("exported"))
    assert main(["push", str(run), "--repo", "not-a-repo", "--dry-run"]) == EXIT_ERROR
    assert "OWNER/NAME" in capsys.readouterr().err
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert main(["push", str(empty), "--repo", "alice/tiny", "--dry-run"]) == EXIT_ERROR
    assert "no finished model" in capsys.readouterr().err
    with pytest.raises(LLMMakerError, match="no model"):
        push(tmp_path / "nothing", "alice/tiny", dry_run=True)


def test_a_refused_upload_is_a_clear_error(run, monkeypatch, capsys):
    def refused(*a, **k):
        raise hub.errors.LocalTokenNotFoundError("Token is required")
    monkeypatch.setattr(push_mod, "send", refused)
    monkeypatch.setattr(hub, "HfApi", lambda: "api")
    assert main(["push", str(run), "--model", "base", "--repo", "alice/tiny"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "the push to alice/tiny failed: Token is required" in err and "HF_TOKEN" in err
