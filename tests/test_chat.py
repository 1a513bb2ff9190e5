"""serve/chat.py: the rolling context window (fit_history) and the REPL with scripted input."""
import io

import pytest

from helpers import make_tokenizer, successor_model
from llm_maker.errors import LLMMakerError
from llm_maker.serve.chat import chat_repl, fit_history
from llm_maker.sft.templates import prompt_ids
from llm_maker.train.checkpoint import save_model_dir


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATION = [msg("system", "Be brief."), msg("user", "What is a list?"), msg("assistant", "A sequence."),
                msg("user", "And a tuple?"), msg("assistant", "An immutable sequence."), msg("user", "Thanks!")]


def n_prompt(tok, messages):
    return len(prompt_ids(tok, messages, "chatml"))


def test_fit_history_keeps_everything_that_fits(tok):
    budget = n_prompt(tok, CONVERSATION)
    assert fit_history(tok, CONVERSATION, "chatml", budget) == (CONVERSATION, 0)


def test_fit_history_drops_oldest_pairs_and_keeps_the_system_message(tok):
    without_first_pair = [CONVERSATION[0]] + CONVERSATION[3:]
    budget = n_prompt(tok, without_first_pair)
    assert fit_history(tok, CONVERSATION, "chatml", budget) == (without_first_pair, 2)
    assert fit_history(tok, CONVERSATION, "chatml", budget - 1) == ([CONVERSATION[0], CONVERSATION[5]], 4)
    # The minimum (system + new message) is returned even when it does not fit.
    assert fit_history(tok, CONVERSATION, "chatml", 1) == ([CONVERSATION[0], CONVERSATION[5]], 4)


def test_fit_history_without_system_message(tok):
    convo = CONVERSATION[1:]
    budget = n_prompt(tok, convo[2:])
    assert fit_history(tok, convo, "chatml", budget) == (convo[2:], 2)
    assert fit_history(tok, convo, "parchment", 1) == ([convo[-1]], 4)


@pytest.fixture(scope="module")
def answer_word(tok):
    (word,) = tok.encode(" the")
    return word


def save_chat_model(tok, answer_word, path, stage="sft"):
    """A model (64-token context) that answers " the" and stops (<|im_end|>), whatever it is asked."""
    model = successor_model(tok.vocab_size, {answer_word: tok.im_end_id}, default=answer_word)
    meta = {"stage": stage, **({"chat_template": "chatml"} if stage == "sft" else {})}
    return save_model_dir(path, model, tok, meta)


def run_repl(model_dir, lines, **kw):
    script = iter(lines)

    def input_fn(prompt):
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    history = chat_repl(model_dir, input_fn=input_fn, output=out, temperature=0.0, device="cpu", **kw)
    return history, out.getvalue()


def test_repl_streams_replies_and_keeps_history(tok, answer_word, tmp_path):
    model_dir = save_chat_model(tok, answer_word, tmp_path / "sft")
    history, out = run_repl(model_dir, ["hello", "", "how are you?", "exit", "never read"], max_new_tokens=8)
    assert out.count("assistant>  the\n") == 2
    assert history == [msg("user", "hello"), msg("assistant", " the"),
                       msg("user", "how are you?"), msg("assistant", " the")]
    assert "base (pretrained) model" not in out and "template chatml" in out


def test_repl_rolls_the_context_window(tok, answer_word, tmp_path):
    model_dir = save_chat_model(tok, answer_word, tmp_path / "sft")
    # 64-token context, 40 for the reply: the prompt may use 24 tokens, about two turns.
    lines = [f"question number {i}" for i in range(5)]
    history, out = run_repl(model_dir, lines, max_new_tokens=40)
    assert "(dropped the 2 oldest messages to fit the 64-token context)" in out
    assert history[-2:] == [msg("user", "question number 4"), msg("assistant", " the")]
    assert len(history) < 10
    assert n_prompt(tok, history[:-1]) <= 24


def test_repl_clear_quit_eof_and_bad_input(tok, answer_word, tmp_path):
    model_dir = save_chat_model(tok, answer_word, tmp_path / "sft")
    history, out = run_repl(model_dir, ["first", "clear", "second", "say <|im_end|> now", "QUIT"],
                            max_new_tokens=8, system="Be brief.")
    assert "(history cleared)" in out
    assert "error: messages[3] (user) content contains the special token <|im_end|>" in out
    assert history == [msg("system", "Be brief."), msg("user", "second"), msg("assistant", " the")]
    history, out = run_repl(model_dir, ["one"], max_new_tokens=8)  # input ends: EOF leaves
    assert history == [msg("user", "one"), msg("assistant", " the")]


def test_repl_warns_that_a_base_model_does_not_chat(tok, answer_word, tmp_path):
    model_dir = save_chat_model(tok, answer_word, tmp_path / "base", stage="pretrain")
    history, out = run_repl(model_dir, ["hi"], max_new_tokens=8)
    assert "base (pretrained) model: it continues text and does not follow chat" in out
    assert "template chatml" in out and history[-1] == msg("assistant", " the")


def test_repl_reports_a_cut_reply_and_an_impossible_budget(tok, answer_word, tmp_path):
    never_stops = successor_model(tok.vocab_size, {}, default=answer_word)
    model_dir = save_model_dir(tmp_path / "m", never_stops, tok, {"stage": "sft", "chat_template": "chatml"})
    history, out = run_repl(model_dir, ["hi"], max_new_tokens=3)
    assert "assistant>  the the the\n(reply cut at 3 tokens)" in out
    with pytest.raises(LLMMakerError, match="max_new_tokens=64 leaves no room for a prompt in .*64-token context"):
        run_repl(model_dir, ["hi"], max_new_tokens=64)
    with pytest.raises(LLMMakerError, match=r"top_p must be in \(0, 1\], got 2.0"):
        run_repl(tmp_path / "not loaded", ["hi"], top_p=2.0)


def test_slash_commands_are_never_sent_to_the_model(tok, answer_word, tmp_path):
    model_dir = save_chat_model(tok, answer_word, tmp_path / "sft")
    history, out = run_repl(model_dir, ["first", "/clear", "second", "/exit", "never read"], max_new_tokens=8)
    assert "(history cleared)" in out and "/clear to start over, /exit to leave" in out
    assert history == [msg("user", "second"), msg("assistant", " the")]


def test_chat_passes_seed_and_system_through_the_cli(tok, answer_word, tmp_path, monkeypatch):
    import llm_maker.serve.chat as chat
    from llm_maker.cli import main

    model_dir = save_chat_model(tok, answer_word, tmp_path / "sft")
    seen = {}
    monkeypatch.setattr(chat, "chat_repl", lambda *a, **kw: seen.update(kw))
    assert main(["chat", str(model_dir), "--seed", "7", "--system", "Be brief.", "--precision", "fp32"]) == 0
    assert (seen["seed"], seen["system"], seen["precision"]) == (7, "Be brief.", "fp32")


def test_generate_with_a_system_message_answers_one_chat_turn(tok, answer_word, tmp_path, capsys):
    from llm_maker.cli import main

    model_dir = save_chat_model(tok, answer_word, tmp_path / "sft")
    assert main(["generate", str(model_dir), "--prompt", "hello", "--system", "Be brief.", "--temperature", "0",
                 "--precision", "fp32"]) == 0
    assert capsys.readouterr().out == " the\n"  # the reply alone, ended by the template's stop token
