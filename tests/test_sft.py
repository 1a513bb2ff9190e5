"""SFT: chat templates and their labels, the built-in set, held-out split, batches, the stage."""
import json

import pytest
import torch

from helpers import tiny_model
from llm_maker.artifacts import read_manifest, write_manifest
from llm_maker.errors import CheckpointError, DataError, LLMMakerError
from llm_maker.layout import RunPaths
from llm_maker.recipe import recipe_from_dict
from llm_maker.sft.builtin import builtin_conversations, first_sentence
from llm_maker.sft.dataset import (
    EncodedConversation,
    SFTBatches,
    encode_conversations,
    load_conversations,
    split_heldout,
)
from llm_maker.sft.stage import run_sft
from llm_maker.sft.templates import IGNORE_INDEX, encode_chat, jinja_chat_template, prompt_ids, stop_token_ids
from llm_maker.tokenizer.tokenizer import train_bpe
from llm_maker.train import trainer
from llm_maker.train.checkpoint import save_model_dir

TEXT = ("system user assistant You are a helpful assistant. What does `json.dumps` do? Serialize obj "
        "to a JSON formatted str. Repeat after me: the quick brown fox. 47 + 83 = 130. 12 - 5 = 7.\n") * 30
CHAT = [{"role": "user", "content": "47 + 83 ="}, {"role": "assistant", "content": "130"}]
TWO_TURNS = [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": "12 + 5 ="}, {"role": "assistant", "content": "17"},
             {"role": "user", "content": "17 - 9 ="}, {"role": "assistant", "content": "8"}]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(iter([TEXT]), vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def builtin():
    return builtin_conversations()


def supervised(labels):
    return [t for t in labels if t != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------- templates

def test_chatml_ids_and_labels_exact(tok):
    ids, labels = encode_chat(tok, CHAT, "chatml")
    e = tok.encode
    expected = ([2] + e("user\n") + e("47 + 83 =") + [3] + e("\n")
                + [2] + e("assistant\n") + e("130") + [3] + e("\n"))
    assert ids == expected
    h1, c1, nl, h2 = (len(e(s)) for s in ("user\n", "47 + 83 =", "\n", "assistant\n"))
    second = 1 + h1 + c1 + 1 + nl  # where the assistant turn's <|im_start|> sits
    assert [i for i, t in enumerate(ids) if t == tok.im_start_id] == [0, second]
    assert [i for i, t in enumerate(ids) if t == tok.im_end_id] == [1 + h1 + c1, second + 1 + h2 + len(e("130"))]
    assert tok.decode(ids) == "<|im_start|>user\n47 + 83 =<|im_end|>\n<|im_start|>assistant\n130<|im_end|>\n"
    # Exactly the answer and its <|im_end|> are learned; the trailing newline is not.
    n = len(e("130")) + 1
    assert labels == [IGNORE_INDEX] * (len(ids) - n - 1) + e("130") + [3] + [IGNORE_INDEX]
    assert len(labels) == len(ids)


def test_parchment_matches_seed_000_format(tok):
    msgs = [{"role": "system", "content": "You are a helpful assistant"}] + CHAT
    ids, labels = encode_chat(tok, msgs, "parchment")
    assert tok.decode(ids) == ("system\nYou are a helpful assistant<|endoftext|>\nuser\n47 + 83 =<|endoftext|>\n"
                               "assistant\n130<|endoftext|>\n")
    assert ids.count(tok.eos_id) == 3 and tok.im_start_id not in ids and tok.im_end_id not in ids
    assert supervised(labels) == tok.encode("130") + [tok.eos_id]
    assert labels[ids.index(tok.eos_id)] == IGNORE_INDEX  # the system turn's end is not learned


@pytest.mark.parametrize("template", ["chatml", "parchment"])
def test_multi_turn_labels_cover_every_answer_and_its_end(tok, template):
    ids, labels = encode_chat(tok, TWO_TURNS, template)
    end = tok.im_end_id if template == "chatml" else tok.eos_id
    assert supervised(labels) == tok.encode("17") + [end] + tok.encode("8") + [end]
    for i, t in enumerate(labels):
        assert t in (IGNORE_INDEX, ids[i])


@pytest.mark.parametrize("template", ["chatml", "parchment"])
def test_prompt_ids_is_a_prefix_ending_in_the_assistant_header(tok, template, builtin):
    for msgs in [CHAT, TWO_TURNS] + [c["messages"] for c in builtin[:50]]:
        ids, labels = encode_chat(tok, msgs, template)
        prompt = prompt_ids(tok, msgs[:-1], template)
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt)] != IGNORE_INDEX  # the answer starts right after the prompt
        if sum(m["role"] == "assistant" for m in msgs) == 1:  # nothing learned before the only answer
            assert all(t == IGNORE_INDEX for t in labels[: len(prompt)])
    header = ("<|im_start|>" if template == "chatml" else "") + "assistant\n"
    assert tok.decode(prompt_ids(tok, CHAT[:1], template)).endswith(header)


def test_stop_tokens(tok):
    assert stop_token_ids(tok, "chatml") == [tok.im_end_id, tok.eos_id] == [3, 0]
    assert stop_token_ids(tok, "parchment") == [tok.eos_id]


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "bot", "content": "hi"}], r"messages\[0\] has role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
     r"messages\[1\] \(assistant\) content must be a string, got int"),
    ([{"role": "user", "content": "hi <|im_end|> there"}], r"messages\[0\] \(user\) content contains the special "
                                                          r"token <\|im_end\|>"),
    (["hi"], r"messages\[0\] must be a dict"),
])
def test_bad_messages_are_clear_errors(tok, messages, match):
    with pytest.raises(LLMMakerError, match=match):
        encode_chat(tok, messages, "chatml")


def test_unknown_template(tok):
    with pytest.raises(LLMMakerError, match="unknown chat template 'llama3'"):
        encode_chat(tok, CHAT, "llama3")


@pytest.mark.parametrize("template", ["chatml", "parchment"])
def test_jinja_template_gives_the_same_ids_in_transformers(tok, template, builtin):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.hf, chat_template=jinja_chat_template(template))
    edge = [{"role": "user", "content": "  leading spaces\n\nand lines  "},
            {"role": "assistant", "content": "\n   indented answer ü ✓\n"}]
    for msgs in [CHAT, TWO_TURNS, edge] + [c["messages"] for c in builtin[:60]]:
        ids, _ = encode_chat(tok, msgs, template)
        assert hf.apply_chat_template(msgs, tokenize=True, return_dict=False) == ids
        prompt = hf.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        assert prompt == prompt_ids(tok, msgs[:-1], template)
    with pytest.raises(Exception, match="role must be system, user or assistant, got tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------------------------------- built-in set

def test_builtin_set_is_large_deterministic_and_well_formed(tok, builtin):
    assert len(builtin) >= 600
    assert builtin_conversations() == builtin
    assert builtin_conversations(seed=1) != builtin
    kinds = {c["kind"] for c in builtin}
    assert kinds == {"arithmetic", "docstring", "repeat", "first_word", "last_word", "word_count", "multi_turn"}
    assert 0.2 < sum(c["messages"][0]["role"] == "system" for c in builtin) / len(builtin) < 0.3
    for c in builtin:
        encode_chat(tok, c["messages"], "chatml")  # validates roles, content, special tokens
        for m in c["messages"]:
            if m["role"] == "assistant":
                assert 0 < len(m["content"]) <= 100
    for c in builtin[:200]:
        user, answer = c["messages"][-2]["content"], c["messages"][-1]["content"]
        if c["kind"] == "arithmetic":
            a, op, b, _ = user.split()
            assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        elif c["kind"] == "first_word":
            assert user.split(": ", 1)[1].startswith(answer)
        elif c["kind"] == "repeat":
            assert user == f"Repeat after me: {answer}"


def test_first_sentence():
    assert first_sentence("Serialize ``obj`` to a JSON str.\n\nIf ``skipkeys`` is true...") == \
        "Serialize ``obj`` to a JSON str."
    assert first_sentence("Return the\n    sum of x. Then more. ") == "Return the sum of x."
    assert first_sentence("Use e.g. this") == "Use e.g. this"


# ---------------------------------------------------------------------------------------- dataset

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_conversations_and_errors_name_file_and_line(tmp_path):
    good = json.dumps({"messages": CHAT, "kind": "x"})
    p = write_lines(tmp_path / "ok.jsonl", [good, "", good])
    assert load_conversations(p) == [{"messages": CHAT, "kind": "x"}] * 2
    cases = [([good, "{not json"], r"bad\.jsonl:2: not valid JSON"),
             ([good, good, '{"text": "hi"}'], r'bad\.jsonl:3: expected an object with a "messages" list'),
             ([json.dumps({"messages": [{"role": "tool", "content": "x"}]})],
              r"bad\.jsonl:1: messages\[0\] has role 'tool'"),
             (["", " "], r"bad\.jsonl: no conversations")]
    for lines, match in cases:
        with pytest.raises(DataError, match=match):
            load_conversations(write_lines(tmp_path / "bad.jsonl", lines))
    assert load_conversations(write_lines(tmp_path / "empty.jsonl", []), allow_empty=True) == []
    with pytest.raises(DataError, match="missing.jsonl: SFT data file not found"):
        load_conversations(tmp_path / "missing.jsonl")


def test_heldout_split_is_deterministic_keyed_and_order_preserving(builtin):
    train, held = split_heldout(builtin, 0.2, "k1")
    assert (train, held) == split_heldout(list(builtin), 0.2, "k1")
    assert len(train) + len(held) == len(builtin) and 0.14 < len(held) / len(builtin) < 0.26
    assert [builtin.index(c) for c in train] == sorted(builtin.index(c) for c in train)
    assert split_heldout(builtin, 0.2, "k2")[1] != held
    assert split_heldout(builtin, 0.0, "k1") == (list(builtin), [])
    # a larger fraction holds out a superset: the hash decides, not the position
    assert all(c in split_heldout(builtin, 0.3, "k1")[1] for c in held)


def test_over_long_and_answerless_conversations_are_dropped_and_counted(tok):
    long = [{"role": "user", "content": "the quick brown fox " * 50}, {"role": "assistant", "content": "ok"}]
    no_answer = [{"role": "user", "content": "hello"}]
    convs = [{"messages": CHAT}, {"messages": long}, {"messages": no_answer}, {"messages": TWO_TURNS}]
    enc, stats = encode_conversations(tok, convs, "chatml", max_len=64)
    ids0, labels0 = encode_chat(tok, CHAT, "chatml")
    assert enc[0] == EncodedConversation(ids0, labels0) and len(enc) == 2
    assert stats["dropped_too_long"] == 1 and stats["dropped_no_assistant"] == 1 and stats["kept"] == 2
    total = len(enc[0].ids) + len(enc[1].ids)
    n_sup = len(supervised(enc[0].labels)) + len(supervised(enc[1].labels))
    assert stats["tokens"] == total and stats["supervised_tokens"] == n_sup
    assert stats["supervised_fraction"] == pytest.approx(n_sup / total, abs=1e-6)
    # exactly max_len tokens still fits: the limit drops, it never truncates
    assert encode_conversations(tok, convs[:1], "chatml", max_len=len(ids0))[1]["kept"] == 1
    assert encode_conversations(tok, convs[:1], "chatml", max_len=len(ids0) - 1)[1]["dropped_too_long"] == 1


@pytest.fixture(scope="module")
def encoded(tok, builtin):
    return encode_conversations(tok, builtin[:40], "chatml", max_len=512)[0]


def test_batches_shift_pad_and_never_pad_with_eos(tok, encoded):
    assert tok.pad_id != tok.eos_id
    b = SFTBatches(encoded, micro_batch_size=4, pad_id=tok.pad_id, seed=7)
    T = max(len(e.ids) for e in encoded) - 1
    x, y = b.micro_batch(0)
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.long
    assert b.tokens_per_micro_batch == 4 * T
    first = encoded[b.item_ids(0)[0]]
    n = len(first.ids) - 1
    assert x[0, : n + 1].tolist() == first.ids and y[0, :n].tolist() == first.labels[1:]
    assert (x[0, n + 1:] == tok.pad_id).all() and (y[0, n:] == IGNORE_INDEX).all()
    assert y[0, n - 2].item() == tok.im_end_id  # the last learned target is the end token


def test_batches_are_deterministic_and_reshuffled_each_epoch(tok, encoded):
    a = SFTBatches(encoded, micro_batch_size=4, pad_id=tok.pad_id, seed=7)
    b = SFTBatches(encoded, micro_batch_size=4, pad_id=tok.pad_id, seed=7)
    for i in (0, 3, 25, 3):
        assert all(torch.equal(u, v) for u, v in zip(a.micro_batch(i), b.micro_batch(i), strict=False))
    per_epoch = len(encoded) // 4
    epoch0 = [i for k in range(per_epoch) for i in a.item_ids(k)]
    epoch1 = [i for k in range(per_epoch, 2 * per_epoch) for i in a.item_ids(k)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(len(encoded)))  # each once per epoch
    assert epoch0 != epoch1
    assert SFTBatches(encoded, 4, tok.pad_id, seed=8).item_ids(0) != a.item_ids(0)
    r0, r1 = (SFTBatches(encoded, 2, tok.pad_id, seed=7, rank=r, world_size=2) for r in (0, 1))
    assert not set(r0.item_ids(0)) & set(r1.item_ids(0))


def test_val_batches_cover_heldout_in_order(tok, encoded):
    b = SFTBatches(encoded[:10], 4, tok.pad_id, seed=0, val_encoded=encoded[10:20])
    val = list(b.val_batches())
    assert [x.shape[0] for x, _ in val] == [4, 4, 2]
    assert val[0][0][1, : len(encoded[11].ids) - 1].tolist() == encoded[11].ids[:-1]
    assert list(SFTBatches(encoded, 4, tok.pad_id, seed=0).val_batches()) == []
    with pytest.raises(DataError, match="no SFT conversations to train on"):
        SFTBatches([], 4, tok.pad_id, seed=0)


# ---------------------------------------------------------------------------------------- stage

def make_run(tmp_path, tok, convs, model_tok=None, seq_len=128, **sft):
    """A run dir with tokenizer/ and pretrain/final (a tiny random model), and its recipe."""
    paths = RunPaths.of(tmp_path / "run")
    tok.save(paths.tokenizer)
    write_manifest(paths.tokenizer, "tokenizer", "tokfp")
    model = tiny_model(tok.vocab_size, n_layers=1, n_heads=2, n_kv_heads=1, seq_len=seq_len)
    save_model_dir(paths.pretrain / "final", model, model_tok or tok, {"stage": "pretrain"})
    write_manifest(paths.pretrain, "pretrain", "prefp")
    data = tmp_path / "chat.jsonl"
    write_lines(data, [json.dumps({"messages": m}) for m in convs])
    train = dict(max_steps=20, micro_batch_size=4, lr=3e-3, warmup_steps=2, eval_every=10, eval_batches=2,
                 checkpoint_every=10, log_every=5, progress=False, device="cpu")
    recipe = recipe_from_dict({"run_dir": str(paths.root), "sft": {
        "data": {"source": str(data), "heldout_fraction": 0.25}, "train": train, **sft}})
    return recipe, paths


class FakeTrainer:
    """Stands in for run_training: records its arguments and writes a final model dir."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, batches, tc, out_dir, tokenizer, meta, resume=False, evaluations=()):
        self.calls.append(dict(batches=batches, meta=meta, resume=resume, evaluations=evaluations))
        final = save_model_dir(out_dir / "final", model, tokenizer, meta)
        return {"final_loss": 1.0, "val_loss": 1.5, "steps": tc.max_steps, "tokens_seen": 10,
                "stopped": False, "final_dir": str(final)}


@pytest.fixture
def fake_trainer(monkeypatch):
    fake = FakeTrainer()
    monkeypatch.setattr(trainer, "run_training", fake)
    return fake


def convs_for_stage(builtin):
    long = [{"role": "user", "content": "the quick brown fox " * 40}, {"role": "assistant", "content": "ok"}]
    return [c["messages"] for c in builtin[:40]] + [long]


def test_stage_writes_data_template_and_manifest_then_skips(tmp_path, tok, builtin, fake_trainer):
    convs = convs_for_stage(builtin)
    recipe, paths = make_run(tmp_path, tok, convs, template="parchment")
    out = run_sft(recipe, paths)
    assert out == paths.sft and len(fake_trainer.calls) == 1
    train = load_conversations(paths.sft / "data" / "train.jsonl")
    held = load_conversations(paths.sft / "data" / "heldout.jsonl")
    assert len(train) + len(held) == len(convs) and held
    call = fake_trainer.calls[0]
    assert call["meta"].chat_template == "parchment" and call["meta"].stop_token_ids == [tok.eos_id]
    assert call["batches"].pad_id == tok.pad_id != tok.eos_id
    assert call["batches"].seq_len <= 128
    cfg = json.loads((paths.sft / "final" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == jinja_chat_template("parchment")
    assert (cfg["eos_token"], cfg["pad_token"]) == ("<|endoftext|>", "<|pad|>")
    m = read_manifest(paths.sft)
    too_long = [c for c in convs if len(encode_chat(tok, c, "parchment")[0]) > 129]  # seq_len + 1
    assert too_long[-1] == convs[-1] and len(too_long) < 5
    dropped = m["data"]["train"]["dropped_too_long"] + m["data"]["heldout"]["dropped_too_long"]
    assert dropped == len(too_long)  # counted, not truncated
    assert m["data"]["train"]["kept"] == len(call["batches"].encoded)
    assert 0 < m["data"]["train"]["supervised_fraction"] < 1 and m["summary"]["final_loss"] == 1.0
    assert run_sft(recipe, paths) == paths.sft and len(fake_trainer.calls) == 1  # up to date: skipped
    run_sft(recipe, paths, force=True)
    assert len(fake_trainer.calls) == 2


def test_stage_refuses_a_base_model_from_another_tokenizer(tmp_path, tok, builtin, fake_trainer):
    other = train_bpe(iter([TEXT + " zebra giraffe"]), vocab_size=420, min_frequency=1)
    recipe, paths = make_run(tmp_path, tok, convs_for_stage(builtin), model_tok=other)
    with pytest.raises(CheckpointError, match="trained with tokenizer"):
        run_sft(recipe, paths)
    assert not fake_trainer.calls


def test_stage_needs_the_pretrain_stage(tmp_path, tok, builtin, fake_trainer):
    recipe, paths = make_run(tmp_path, tok, convs_for_stage(builtin))
    (paths.pretrain / "manifest.json").unlink()
    with pytest.raises(LLMMakerError, match="run the `pretrain` stage first"):
        run_sft(recipe, paths)


def test_stage_trains_for_real_and_the_loss_falls(tmp_path, tok, builtin):
    import csv

    recipe, paths = make_run(tmp_path, tok, convs_for_stage(builtin), template="chatml")
    run_sft(recipe, paths)
    with open(paths.sft / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["step"]) == 20 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    final = json.loads((paths.sft / "final" / "config.json").read_text())
    assert final["chat_template"] == "chatml" and final["stop_token_ids"] == [3, 0]
    # transformers reads sft/final's tokenizer files and renders the same ids
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(paths.sft / "final"))
    assert (hf.eos_token, hf.pad_token) == ("<|im_end|>", "<|pad|>")
    assert hf.apply_chat_template(TWO_TURNS, return_dict=False) == encode_chat(tok, TWO_TURNS, "chatml")[0]
    # the same config and data cannot resume onto checkpoints made for another one
    recipe2, _ = make_run(tmp_path / "other", tok, convs_for_stage(builtin), template="parchment")
    recipe2.run_dir = recipe.run_dir
    with pytest.raises(CheckpointError, match="another config"):
        run_sft(recipe2, paths)
    with pytest.raises(CheckpointError, match="another SFT config"):
        run_sft(recipe2, paths, resume=True)


def test_stage_builtin_source_is_capped(tmp_path, tok, builtin, fake_trainer):
    recipe, paths = make_run(tmp_path, tok, convs_for_stage(builtin))
    recipe.sft.data.source, recipe.sft.data.max_conversations = "builtin", 50
    run_sft(recipe, paths)
    rows = [load_conversations(paths.sft / "data" / f, allow_empty=True) for f in ("train.jsonl", "heldout.jsonl")]
    assert len(rows[0]) + len(rows[1]) == 50
    assert {r["kind"] for r in rows[0]} >= {"arithmetic", "docstring"}  # a prefix of the set mixes the kinds
    recipe.sft.data.max_conversations = 0
    with pytest.raises(DataError, match=r"no SFT training conversations from sft.data.source='builtin' "
                                        r"\(max_conversations=0"):
        run_sft(recipe, paths, force=True)
