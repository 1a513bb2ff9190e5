"""sft/formats.py: Alpaca, Dolly, SQuAD, messages and ShareGPT rows from local jsonl / json /
parquet files (and a `datasets` folder), weighted mixtures, system stripping, dedup, the stage."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import tiny_model
from llm_maker.artifacts import read_manifest, write_manifest
from llm_maker.errors import CheckpointError, DataError, RecipeError
from llm_maker.layout import RunPaths
from llm_maker.recipe import SFTDataConfig, SFTSourceConfig, recipe_from_dict
from llm_maker.sft.builtin import builtin_conversations
from llm_maker.sft.dataset import split_heldout
from llm_maker.sft.formats import CONVERTERS, FORMATS, copies, detect_format, load_sft_data, load_source
from llm_maker.sft.stage import run_sft
from llm_maker.tokenizer.tokenizer import train_bpe
from llm_maker.train import trainer
from llm_maker.train.checkpoint import save_model_dir


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def chat(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say nothing.", "input": "", "output": "  "}]
DOLLY = [{"instruction": "Who wrote it?", "context": "Hamlet was written by Shakespeare.",
          "response": "Shakespeare.", "category": "closed_qa"},
         {"instruction": "Give a fruit.", "context": "", "response": "An apple.", "category": "brainstorming"}]
SQUAD = [{"id": "1", "title": "T", "context": "The Nile flows north.", "question": "Which way does the Nile flow?",
          "answers": {"text": ["north", "North"], "answer_start": [15, 15]}},
         {"id": "2", "title": "T", "context": "The Nile flows north.", "question": "How old is the Nile?",
          "answers": {"text": [], "answer_start": []}}]  # SQuAD v2: unanswerable
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello."}]},
            {"conversations": [{"from": "human", "value": "Only a question <|im_end|>"},
                               {"from": "gpt", "value": "x"}]}]
MESSAGES = [{"messages": chat("2 + 2 =", "4")}, {"messages": [{"role": "user", "content": "no answer"}]}]


@pytest.mark.parametrize("rows, fmt, expected, dropped", [
    (ALPACA, "alpaca", [chat("Name a colour.", "Blue."), chat("Add the numbers.\n\n2 and 3", "5")],
     {"empty_answer": 1}),
    (DOLLY, "dolly", [chat("Who wrote it?\n\nHamlet was written by Shakespeare.", "Shakespeare."),
                      chat("Give a fruit.", "An apple.")], {}),
    (SQUAD, "squad", [chat("The Nile flows north.\n\nQuestion: Which way does the Nile flow?", "north")],
     {"no_answer": 1}),
    (SHAREGPT, "sharegpt", [[{"role": "system", "content": "Be brief."}] + chat("Hi", "Hello.")],
     {"special_token": 1}),
    (MESSAGES, "messages", [chat("2 + 2 =", "4")], {"no_assistant": 1}),
])
def test_each_format_from_jsonl_auto_detected(tmp_path, rows, fmt, expected, dropped):
    convs, stats = load_source(jsonl(tmp_path / f"{fmt}.jsonl", rows))
    assert [c["messages"] for c in convs] == expected
    assert stats == {"rows": len(rows), "kept": len(expected), "dropped": dropped, "format": fmt}
    assert detect_format(rows[0]) == fmt and convs[0]["source"] == f"{fmt}.jsonl"


def test_parquet_and_json_array_files(tmp_path):
    table = pa.Table.from_pylist(SQUAD)  # answers becomes a struct column, as in the hub's parquet
    pq.write_table(table, tmp_path / "squad.parquet")
    convs, stats = load_source(str(tmp_path / "squad.parquet"))
    assert [c["messages"][1]["content"] for c in convs] == ["north"] and stats["dropped"] == {"no_answer": 1}
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA))  # Alpaca ships as one JSON array
    convs, _ = load_source(str(tmp_path / "alpaca.json"), "alpaca")
    assert len(convs) == 2


@pytest.mark.parametrize("rows, fmt, message", [
    ([ALPACA[0], {"instruction": "x"}], "auto", r"a\.jsonl:2: not a alpaca row: missing field 'output' or 'response'"),
    ([{"foo": 1}], "auto", r"a\.jsonl:1: .*no known instruction format has the fields foo"),
    ([{"messages": "hi"}], "messages", r"a\.jsonl:1: not a messages row: field 'messages' must be a list"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "messages", r"a\.jsonl:1: .*has role 'robot'"),
    ([{"conversations": [{"from": "alien", "value": "x"}]}], "sharegpt", r"conversations\[0\] must have 'from'"),
    ([{"context": "c", "question": "q", "answers": "north"}], "squad", r"field 'answers' must be"),
])
def test_malformed_rows_name_file_and_row(tmp_path, rows, fmt, message):
    with pytest.raises(DataError, match=message):
        load_source(jsonl(tmp_path / "a.jsonl", rows), fmt)


def test_a_datasets_folder_is_read_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "dolly"
    folder.mkdir()
    jsonl(folder / "train.jsonl", DOLLY)
    convs, stats = load_source(f"hf:{folder}")
    assert [c["messages"][1]["content"] for c in convs] == ["Shakespeare.", "An apple."] and stats["format"] == "dolly"


def test_an_unreachable_hub_dataset_says_how_to_fetch_it(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hf:nobody/no-such-set \(split 'train'\) could not be loaded: .*\n.*\n"
                                        r"  hf download nobody/no-such-set --repo-type dataset"):
        load_source("hf:nobody/no-such-set")


def test_weights_repeat_or_subsample_deterministically(tmp_path):
    rows = [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(400)]
    a = jsonl(tmp_path / "a.jsonl", rows)
    cfg = SFTDataConfig(mixture=[SFTSourceConfig(source=a, weight=2.0)])
    convs, stats = load_sft_data(cfg, seed=0, selection_key="k")
    assert len(convs) == 800 and stats["sources"][0]["in_mixture"] == 800
    half = SFTDataConfig(mixture=[SFTSourceConfig(source=a, weight=0.5)])
    kept, _ = load_sft_data(half, seed=0, selection_key="k")
    assert 160 < len(kept) < 240 and kept == load_sft_data(half, seed=0, selection_key="k")[0]
    assert load_sft_data(half, seed=0, selection_key="other")[0] != kept  # another key, another half
    bigger, _ = load_sft_data(SFTDataConfig(mixture=[SFTSourceConfig(source=a, weight=0.8)]), 0, "k")
    assert all(c in bigger for c in kept)  # the 0.5 half is inside the 0.8 one
    onehalf, _ = load_sft_data(SFTDataConfig(mixture=[SFTSourceConfig(source=a, weight=1.5)]), 0, "k")
    assert len(onehalf) == 400 + len(kept)
    assert copies(chat("x", "y"), 3.0, b"k") == 3


def test_copies_of_a_conversation_land_on_one_side_of_the_heldout_split(tmp_path):
    rows = [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(200)]
    convs, _ = load_sft_data(SFTDataConfig(mixture=[SFTSourceConfig(source=jsonl(tmp_path / "a.jsonl", rows),
                                                                    weight=3.0)]), 0, "k")
    train, held = split_heldout(convs, 0.2, "k")
    seen_train = {json.dumps(c["messages"]) for c in train}
    assert held and not any(json.dumps(c["messages"]) in seen_train for c in held)


def test_mixture_strips_system_messages_then_dedups_across_sources(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "system", "content": "Be nice."}] + chat("Hi", "Hello.")},
                                     {"messages": chat("Bye", "Goodbye.")}])
    b = jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                       {"from": "gpt", "value": "Hello."}]},
                                     {"conversations": [{"from": "human", "value": "Bye"},
                                                        {"from": "gpt", "value": "Goodbye."}]},
                                     {"conversations": [{"from": "human", "value": "New"},
                                                        {"from": "gpt", "value": "Yes."}]}])
    mix = [SFTSourceConfig(source=a), SFTSourceConfig(source=b, weight=1.0)]
    convs, stats = load_sft_data(SFTDataConfig(mixture=mix, strip_system=True), 0, "k")
    assert [c["messages"] for c in convs] == [chat("Hi", "Hello."), chat("Bye", "Goodbye."), chat("New", "Yes.")]
    counts = [(s["system_stripped"], s["duplicates"], s["in_mixture"]) for s in stats["sources"]]
    assert counts == [(1, 0, 2), (0, 2, 1)]
    kept_system, stats = load_sft_data(SFTDataConfig(mixture=mix), 0, "k")  # system kept: "Hi" differs
    assert len(kept_system) == 4 and stats["sources"][1]["duplicates"] == 1
    no_dedup, _ = load_sft_data(SFTDataConfig(mixture=mix, dedup=False), 0, "k")
    assert len(no_dedup) == 5
    capped, _ = load_sft_data(SFTDataConfig(mixture=mix, max_conversations=2), 0, "k")
    assert len(capped) == 2


def test_builtin_source_is_unchanged_by_the_loader():
    convs, stats = load_sft_data(SFTDataConfig(), seed=5, selection_key="k")
    assert [c["messages"] for c in convs] == [c["messages"] for c in builtin_conversations(seed=5)]
    assert stats["sources"][0]["duplicates"] == 0


def test_recipe_validates_mixture_entries(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", ALPACA)
    r = recipe_from_dict({"sft": {"data": {"mixture": [{"source": "a.jsonl", "weight": 2},
                                                       {"source": "hf:databricks/databricks-dolly-15k"}]}}},
                         base=tmp_path)
    assert r.sft.data.mixture[0].source == a and r.sft.data.mixture[0].weight == 2.0
    for entry, message in [({"source": "a.jsonl", "format": "csv"}, r"`sft.data.mixture\[0\].format` must be one of"),
                           ({"source": "missing.jsonl"}, r"`sft.data.mixture\[0\].source` does not exist"),
                           ({"source": "a.jsonl", "weight": 0}, r"`sft.data.mixture\[0\].weight` must be positive"),
                           ({"source": "a.jsonl", "colour": "red"}, r"unknown key `sft.data.mixture\[0\].colour`")]:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({"sft": {"data": {"mixture": [entry]}}}, recipe_file="r.yaml", base=tmp_path)


def test_the_sft_stage_trains_on_a_mixture_and_records_it(tmp_path, monkeypatch):
    text = " ".join(r["instruction"] + " " + r.get("output", r.get("response", "")) for r in ALPACA + DOLLY) * 20
    tok = train_bpe(iter([text]), vocab_size=300, min_frequency=1)
    paths = RunPaths.of(tmp_path / "run")
    tok.save(paths.tokenizer)
    write_manifest(paths.tokenizer, "tokenizer", "tokfp")
    model = tiny_model(tok.vocab_size, n_layers=1, n_heads=2, n_kv_heads=1, seq_len=128)
    save_model_dir(paths.pretrain / "final", model, tok, {"stage": "pretrain"})
    write_manifest(paths.pretrain, "pretrain", "prefp")
    calls = []

    def fake_training(model, batches, tc, out_dir, tokenizer, meta, resume=False, evaluations=()):
        calls.append(batches)
        final = save_model_dir(out_dir / "final", model, tokenizer, meta)
        return {"final_loss": 1.0, "stopped": False, "final_dir": str(final)}

    monkeypatch.setattr(trainer, "run_training", fake_training)
    a = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(30)])
    d = jsonl(tmp_path / "dolly.jsonl",
              [{"instruction": f"W{i}", "context": "", "response": f"R{i}"} for i in range(20)])
    recipe = recipe_from_dict({"run_dir": str(paths.root), "sft": {"data": {
        "mixture": [{"source": a, "weight": 2}, {"source": d, "format": "dolly"}], "heldout_fraction": 0.2},
        "train": {"max_steps": 2, "progress": False, "device": "cpu"}}})
    run_sft(recipe, paths)
    m = read_manifest(paths.sft)
    assert m["data"]["mixture"]["conversations"] == 80
    assert [s["in_mixture"] for s in m["data"]["mixture"]["sources"]] == [60, 20]
    train = (paths.sft / "data" / "train.jsonl").read_text().splitlines()
    held = (paths.sft / "data" / "heldout.jsonl").read_text().splitlines()
    assert len(train) + len(held) == 80 and {json.loads(x)["source"] for x in train} == {"alpaca.jsonl", "dolly.jsonl"}
    a2 = jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Q{i}", "output": f"B{i}"} for i in range(30)])
    assert a2 == a
    with pytest.raises(CheckpointError, match="another config"):  # a source's bytes changed: not up to date
        run_sft(recipe, paths)
    run_sft(recipe, paths, force=True)
    assert len(calls) == 2


def test_the_recipe_format_choice_is_auto_and_one_per_converter():
    assert FORMATS == ("auto", *CONVERTERS)
