"""Instruction sets in the formats they ship in, turned into conversations, mixed and deduplicated.

  format     one row                                               e.g.
  messages   messages: [{role, content}, ...]                      SmolTalk, UltraChat, sft/data/*.jsonl
  sharegpt   conversations: [{from: system|human|gpt, value}, ...] ShareGPT, SlimOrca
  alpaca     instruction, input, output                            Alpaca, Alpaca-GPT4
  dolly      instruction, context, response                        databricks-dolly-15k
  squad      context, question, answers: {text: [...]}             SQuAD (extractive QA; the LLM Maker
                                                                    design doc's models B/C used it)
`auto` reads the format off the first row's fields.

A source is `builtin`, a local .jsonl / .json (one array) / .parquet file, or `hf:owner/name` or
`hf:owner/name:config` read with the `datasets` library (online, or from its cache). A row that
does not have its format's fields is an error naming the file and row; a row that has them
but cannot teach anything (an empty answer, SQuAD v2's unanswerable questions, content that
spells a special token) is dropped and counted.

A mixture lists sources with weights: a weight is the expected number of copies of each of the
source's conversations (2: every one twice; 0.5: the half whose keyed hash falls below 0.5), so
mixing is deterministic and a conversation's copies all land on the same side of the held-out
split. System messages can be stripped first, then exact repeats are dropped across sources.
"""
from __future__ import annotations

import hashlib
import json
import typing
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from llm_maker.artifacts import iter_jsonl_rows, sha256_file
from llm_maker.data.builtin import builtin_signature
from llm_maker.data.select import hash_key, unit_hash
from llm_maker.data.sources import PARQUET_BATCH_ROWS
from llm_maker.errors import DataError, LLMMakerError
from llm_maker.recipe import SFTDataConfig, SFTFormat, SFTSourceConfig
from llm_maker.sft.builtin import builtin_conversations
from llm_maker.sft.templates import validate_messages
from llm_maker.tokenizer.tokenizer import SPECIAL_TOKENS

FORMATS: tuple[str, ...] = typing.get_args(SFTFormat)  # the recipe's choice: "auto", then one per converter
MIX_PERSON = b"llm-maker:mix"  # BLAKE2b personalisation of the fractional-weight coin
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}



class Unusable(Exception):
    """A well-formed row with nothing to learn from; `reason` is its count's name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------
# Row -> messages: one pure function per format
# --------------------------------------------------------------------------------------

def _field(row: dict, *names: str, required: bool = True) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    if required:
        raise ValueError(f"missing field {' or '.join(repr(n) for n in names)} (fields: {', '.join(sorted(row))})")
    return None


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _pair(user: str, answer: str) -> list[dict[str, str]]:
    if not user:
        raise Unusable("empty_prompt")
    if not answer:
        raise Unusable("empty_answer")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def from_instruction(row: dict) -> list[dict[str, str]]:
    """Alpaca (instruction, input, output) and Dolly (instruction, context, response)."""
    instruction = _text(_field(row, "instruction"), "instruction")
    extra = _field(row, "input", "context", required=False)
    extra = _text(extra, "input/context") if extra is not None else ""
    answer = _text(_field(row, "output", "response"), "output/response")
    return _pair(f"{instruction}\n\n{extra}" if extra else instruction, answer)


def from_squad(row: dict) -> list[dict[str, str]]:
    """Passage and question -> the first reference answer; no answer (SQuAD v2) is unusable."""
    context = _text(_field(row, "context"), "context")
    question = _text(_field(row, "question"), "question")
    answers = _field(row, "answers")
    texts = answers.get("text") if isinstance(answers, dict) else answers
    if not isinstance(texts, list):
        raise ValueError(f"field 'answers' must be {{'text': [...]}} or a list, got {type(answers).__name__}")
    if not texts:
        raise Unusable("no_answer")
    return _pair(f"{context}\n\nQuestion: {question}", _text(texts[0], "answers.text[0]"))


def from_messages(row: dict) -> list[dict[str, str]]:
    messages = _field(row, "messages")
    if not isinstance(messages, list):
        raise ValueError(f"field 'messages' must be a list, got {type(messages).__name__}")
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]


def from_sharegpt(row: dict) -> list[dict[str, str]]:
    turns = _field(row, "conversations")
    if not isinstance(turns, list):
        raise ValueError(f"field 'conversations' must be a list, got {type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
            raise ValueError(f"conversations[{i}] must have 'from' in {sorted(SHAREGPT_ROLES)}, got {t!r:.80}")
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    return out


CONVERTERS: dict[str, Callable[[dict], list[dict[str, str]]]] = {
    "messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_instruction, "dolly": from_instruction,
    "squad": from_squad,
}


def detect_format(row: dict) -> str:
    """The format whose fields the row has."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "question" in row and "answers" in row:
        return "squad"
    if "instruction" in row and "response" in row:
        return "dolly"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise ValueError(f"no known instruction format has the fields {', '.join(sorted(row))}; "
                     f"expected one of {', '.join(FORMATS[1:])}")


def to_conversation(row: Any, fmt: str) -> list[dict[str, str]]:
    """Messages of one row (ValueError: malformed; Unusable: nothing to learn)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    messages = CONVERTERS[fmt](row)
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), str) and any(t in m["content"] for t in SPECIAL_TOKENS):
            raise Unusable("special_token")
    try:
        validate_messages(messages)
    except LLMMakerError as e:
        raise ValueError(str(e)) from None
    if not any(m["role"] == "assistant" for m in messages):
        raise Unusable("no_assistant")
    return messages


# --------------------------------------------------------------------------------------
# Reading rows: local files or the hub (datasets)
# --------------------------------------------------------------------------------------

def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """(where, row) of a .jsonl / .json / .parquet file or an `hf:` dataset; `where` names file and row."""
    if source.startswith("hf:"):
        yield from _hub_rows(source[3:], split)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: SFT data file not found")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))
    else:
        yield from iter_jsonl_rows(path, "SFT data file")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                yield f"{path}:row {row}", record
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable parquet file after row {row} ({e})") from None


def _hub_rows(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name} is read with the `datasets` library: pip install 'llm-maker[data]'") from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError ...)
        raise DataError(f"hf:{name} (split {split!r}) could not be loaded: {type(e).__name__}: {e}\n"
                        f"Offline? Fetch it by hand and point `source` at a .jsonl/.parquet file:\n"
                        f"  hf download {repo} --repo-type dataset --local-dir DIR") from None
    for i, row in enumerate(ds):
        yield f"hf:{name}[{i}]", row


# --------------------------------------------------------------------------------------
# One source, then the mixture
# --------------------------------------------------------------------------------------

def load_source(source: str, fmt: str = "auto", split: str = "train", seed: int = 0,
                max_conversations: Optional[int] = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Conversations ({"messages", "source"}) of one source, and counts: rows, kept, dropped by reason."""
    if source == "builtin":
        convs = [{**c, "source": "builtin"} for c in builtin_conversations(seed=seed)][:max_conversations]
        return convs, {"rows": len(convs), "kept": len(convs), "dropped": {}, "format": "messages"}
    convs, dropped, rows = [], Counter(), 0
    label = source if source.startswith("hf:") else Path(source).name
    for where, row in iter_rows(source, split):
        if max_conversations is not None and len(convs) >= max_conversations:
            break
        rows += 1
        try:
            if fmt == "auto":
                fmt = detect_format(row) if isinstance(row, dict) else "messages"
            convs.append({"messages": to_conversation(row, fmt), "source": label})
        except Unusable as u:
            dropped[u.reason] += 1
        except ValueError as e:
            raise DataError(f"{where}: not a {fmt} row: {e}") from None
    return convs, {"rows": rows, "kept": len(convs), "dropped": dict(sorted(dropped.items())), "format": fmt}


def strip_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [m for m in messages if m["role"] != "system"]


def conversation_digest(messages: list[dict[str, str]]) -> bytes:
    return hashlib.blake2b(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8"),
                           digest_size=16).digest()


def copies(messages: list[dict[str, str]], weight: float, key: bytes) -> int:
    """How many times a conversation enters the mixture: floor(weight), plus one if its keyed
    hash falls below the fractional part."""
    whole = int(weight)
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False)
    return whole + (1 if unit_hash(text, key, MIX_PERSON) < weight - whole else 0)


def load_sft_data(cfg: SFTDataConfig, seed: int, selection_key: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The conversations of sft.data (its `source`, or its weighted `mixture`) and what happened to them."""
    entries = cfg.mixture or [SFTSourceConfig(source=cfg.source, format=cfg.format)]
    key = hash_key(selection_key)
    seen: set[bytes] = set()
    out: list[dict[str, Any]] = []
    stats = []
    for entry in entries:
        convs, st = load_source(entry.source, entry.format, entry.split, seed, entry.max_conversations)
        st.update(source=entry.source, weight=entry.weight, system_stripped=0, duplicates=0)
        added = 0
        for conv in convs:
            if cfg.strip_system and any(m["role"] == "system" for m in conv["messages"]):
                conv = {**conv, "messages": strip_system(conv["messages"])}
                st["system_stripped"] += 1
            if cfg.dedup:
                digest = conversation_digest(conv["messages"])
                if digest in seen:
                    st["duplicates"] += 1
                    continue
                seen.add(digest)
            n = copies(conv["messages"], entry.weight, key)
            out.extend([conv] * n)
            added += n
        st["in_mixture"] = added
        stats.append(st)
    if cfg.max_conversations is not None:
        out = out[: cfg.max_conversations]
    return out, {"sources": stats, "conversations": len(out), "strip_system": cfg.strip_system, "dedup": cfg.dedup}


def data_signature(cfg: SFTDataConfig, seed: int) -> list[dict[str, Any]]:
    """What decides the SFT data besides its config: the bytes of each file, the seed of the
    built-in set, the name of a hub dataset (pin a revision by fetching it as a file)."""
    sig = []
    for source in [m.source for m in cfg.mixture] or [cfg.source]:
        if source == "builtin":
            sig.append({"builtin": builtin_signature(), "seed": seed})
        elif source.startswith("hf:"):
            sig.append({"hub": source})
        else:
            sig.append({"sha256": sha256_file(source)} if Path(source).is_file() else {"missing": source})
    return sig
