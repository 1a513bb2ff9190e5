"""The built-in instruction set: ~900 short conversations made offline, deterministically.

Kinds (the `kind` field), all with short answers so a tiny model trained for minutes on a CPU
can learn to answer and, above all, to stop:
  arithmetic          "47 + 83 =" -> "130", ParchmentLM-166M-Instruct's format (sums and differences of ints < 100)
  docstring           "What does `json.dumps` do?" -> the first sentence of its docstring
  repeat, first_word, last_word, word_count
                      copy/format tasks over real sentences (stdlib docstring summaries)
  multi_turn          two user/assistant exchanges that build on each other
A quarter of the conversations open with ParchmentLM-166M-Instruct's system prompt, so a model sees both.

Everything comes from one `random.Random(seed)` and the stdlib's docstrings (read with `ast`
by `llm_maker.data.builtin`), so the set depends only on the seed and the Python version.
"""
from __future__ import annotations

import functools
import random
import re
from typing import NamedTuple

from llm_maker.data.builtin import stdlib_docstrings

SYSTEM_PROMPT = "You are a helpful assistant."
MAX_ANSWER_CHARS = 100  # ~30 tokens of a small BPE: short enough to learn to stop early
N_ARITHMETIC = 300
N_DOCSTRING = 300
N_PER_COPY_TASK = 60
N_MULTI_TURN = 60
SKIP_MODULES = ("idlelib",)  # IDLE's own widgets: thousands of internals nobody asks about
SYSTEM_PROMPT_EVERY = 4  # about one conversation in four carries the system prompt


class Summary(NamedTuple):
    """A stdlib object and the first sentence of its docstring."""

    name: str  # "json.dumps"
    module: str  # "json"
    kind: str  # module | class | function
    sentence: str  # "Serialize ``obj`` to a JSON formatted ``str``."


def first_sentence(docstring: str) -> str:
    """The docstring's first paragraph joined into one line, cut after its first sentence."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s+[A-Z(`\"]|$)", paragraph)
    return match.group(1) if match else paragraph


def _is_good_sentence(s: str) -> bool:
    """A plain English sentence: complete, short, not a signature line like `f(x) -> y`."""
    return (s.endswith(".") and 20 <= len(s) <= MAX_ANSWER_CHARS and len(s.split()) >= 4
            and s[0].isupper() and "->" not in s and "(" not in s.split()[0] and ">>>" not in s)


@functools.lru_cache(maxsize=1)
def stdlib_summaries() -> tuple[Summary, ...]:
    """Public stdlib objects whose docstring opens with a short sentence, sorted by name."""
    found: dict[str, Summary] = {}
    for d in stdlib_docstrings(min_chars=1):
        if any(part.startswith("_") for part in d.qualified_name.split(".")) or d.qualified_name in SKIP_MODULES \
                or d.qualified_name.startswith(tuple(m + "." for m in SKIP_MODULES)):
            continue  # private helpers, dunders, IDE internals: not what a user asks about
        sentence = first_sentence(d.text)
        if not _is_good_sentence(sentence):
            continue
        local = d.doc_id.rsplit(":", 1)[1]  # "JSONDecoder.decode", or "<module>"
        if local == "<module>":
            module, kind = d.qualified_name, "module"
        else:
            module = d.qualified_name[: -len(local) - 1]
            kind = "class" if local.split(".")[-1][:1].isupper() else "function"
        found.setdefault(d.qualified_name, Summary(d.qualified_name, module, kind, sentence))
    return tuple(found[name] for name in sorted(found))


def _chat(*turns: str) -> list[dict[str, str]]:
    """Alternate user/assistant messages: _chat(q1, a1, q2, a2, ...)."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _arithmetic_question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"{a} + {b} =", a + b
    a, b = max(a, b), min(a, b)  # non-negative differences only
    return f"{a} - {b} =", a - b


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    seen: dict[str, dict] = {}
    while len(seen) < n:
        q, answer = _arithmetic_question(rng)
        seen.setdefault(q, {"messages": _chat(q, str(answer)), "kind": "arithmetic"})
    return list(seen.values())


def docstring_question(s: Summary) -> str:
    if s.kind == "module":
        return f"What is the `{s.name}` module for?"
    if s.kind == "class":
        return f"What is `{s.name}`?"
    return f"What does `{s.name}` do?"


def docstring_qa(rng: random.Random, summaries: tuple[Summary, ...], n: int) -> list[dict]:
    picked = rng.sample(summaries, min(n, len(summaries)))
    return [{"messages": _chat(docstring_question(s), s.sentence), "kind": "docstring"} for s in picked]


def _words(sentence: str) -> list[str]:
    return [w.strip(".,;:!?`'\"()") for w in sentence.split()]


COPY_TASKS = {
    "repeat": ("Repeat after me: {s}", lambda s: s),
    "first_word": ("What is the first word of: {s}", lambda s: _words(s)[0]),
    "last_word": ("What is the last word of: {s}", lambda s: _words(s)[-1]),
    "word_count": ("How many words are in: {s}", lambda s: str(len(s.split()))),
}


def copy_tasks(rng: random.Random, summaries: tuple[Summary, ...], n_per_task: int) -> list[dict]:
    # Short sentences whose edge words are plain words, so "first/last word" has one answer.
    sentences = sorted({s.sentence for s in summaries if len(s.sentence.split()) <= 12
                        and _words(s.sentence)[0].isalpha() and _words(s.sentence)[-1].isalpha()})
    out = []
    for kind, (question, answer) in COPY_TASKS.items():
        for s in rng.sample(sentences, min(n_per_task, len(sentences))):
            out.append({"messages": _chat(question.format(s=s), answer(s)), "kind": kind})
    return out


def multi_turn(rng: random.Random, summaries: tuple[Summary, ...], n: int) -> list[dict]:
    """Half arithmetic chains ("12 + 5 =" "17" "17 - 9 =" "8"), half docstring follow-ups."""
    out = []
    for _ in range(n // 2):
        a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 99)
        s = a + b
        follow = f"{s} - {c} =" if c <= s else f"{s} + {c} ="
        out.append({"messages": _chat(f"{a} + {b} =", str(s), follow, str(s - c if c <= s else s + c)),
                    "kind": "multi_turn"})
    members = [s for s in summaries if s.kind != "module"]
    for s in rng.sample(members, min(n - n // 2, len(members))):
        out.append({"messages": _chat(docstring_question(s), s.sentence,
                                      f"Which module is `{s.name}` in?", f"It is in the `{s.module}` module."),
                    "kind": "multi_turn"})
    return out


def builtin_conversations(seed: int = 0) -> list[dict]:
    """The built-in instruction set, shuffled so that any prefix mixes every kind."""
    rng = random.Random(seed)
    summaries = stdlib_summaries()
    convs = (arithmetic(rng, N_ARITHMETIC) + docstring_qa(rng, summaries, N_DOCSTRING)
             + copy_tasks(rng, summaries, N_PER_COPY_TASK) + multi_turn(rng, summaries, N_MULTI_TURN))
    rng.shuffle(convs)
    for i, conv in enumerate(convs):
        if i % SYSTEM_PROMPT_EVERY == 0:
            conv["messages"] = [{"role": "system", "content": SYSTEM_PROMPT}] + conv["messages"]
    return convs
