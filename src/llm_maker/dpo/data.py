"""DPO data: (prompt, chosen, rejected) triples from a file, the hub or the built-in set; the
held-out split; encoding through the chat template; padded pair batches.

A triple is {"prompt": [messages before the final assistant turn], "chosen": str, "rejected": str},
optionally with "chosen_ends_turn" / "rejected_ends_turn" (default true: the completion closes
its turn with the template's end token). Layouts of a preference row (`dpo.data.format`):

  pairs     prompt (a string: one user turn, or a message list), chosen, rejected   (strings)
  messages  chosen, rejected: message lists that share everything before their last
            (assistant) message, which is the completion                  (UltraFeedback-binarized)
  hh        chosen, rejected: whole dialogues "\\n\\nHuman: ...\\n\\nAssistant: ...", split on the
            last "\\n\\nAssistant:"                                          (Anthropic HH-RLHF)
  auto      read off the first row's fields

A row without its layout's fields is a DataError naming the file and row; a row that has them but
holds no usable preference (a null completion or an empty chosen one, chosen == rejected, a special
token in the text, HH dialogues whose prompts differ) is dropped and counted. An empty rejected
completion is kept: an answer that closes its turn at once is one way to fail.

The built-in set (`source: builtin`) is made from the built-in SFT conversations (sft/builtin.py):
the prompt is every message before the last answer; chosen is that answer, which ends its turn with
the template's end token (<|im_end|> in chatml); rejected is the same answer rambling on with the
text of the next conversations' answers (at most RAMBLE_CHARS characters more, cut at a word boundary),
WITHOUT the end token (`rejected_ends_turn: false`). Both completions start alike, so the only
lesson in a pair is where the answer stops: DPO raises the end token's probability right after
an answer. The shared answer cancels out of the margin, so nothing holds the answer itself up: a
model tuned too long learns to close its turn at once (bench/dpo_cpu.py measures the stop rate
and the share of non-empty answers that stop, and shows it). Mixing in pairs that reject an empty
answer instead taught the bench's tiny model to avoid the end token altogether, so the set is
rambles only.

Encoding never truncates (as SFT): a pair whose chosen or rejected sequence does not fit
model.seq_len + 1 tokens is dropped and counted; a prompt that alone exceeds model.seq_len (no
room for a single completion token) is counted apart. Labels are the completion's ids (and its end
token), -100 elsewhere: the log-probs are completion-only.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import torch

from llm_maker.artifacts import sha256_file
from llm_maker.data.builtin import builtin_signature
from llm_maker.data.select import hash_key, unit_hash
from llm_maker.errors import DataError, LLMMakerError
from llm_maker.recipe import PreferenceDataConfig
from llm_maker.sft.builtin import builtin_conversations
from llm_maker.sft.dataset import EncodedConversation, EpochOrder, pad_batch
from llm_maker.sft.formats import Unusable, iter_rows
from llm_maker.sft.templates import IGNORE_INDEX, prompt_ids, template_spec, validate_messages
from llm_maker.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer

HELDOUT_PERSON = b"llm-maker:dpo"  # BLAKE2b personalisation: independent of SFT's and the data stage's coins
RAMBLE_CHARS = 60  # the built-in rejected answer runs on this many characters past the answer
HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"
LAYOUTS = ("pairs", "messages", "hh")


# --------------------------------------------------------------------------------------
# Row -> triple, one function per layout
# --------------------------------------------------------------------------------------

def _field(row: dict, name: str) -> Any:
    if name not in row:
        raise ValueError(f'no "{name}" field (fields: {", ".join(sorted(row))})')
    return row[name]


def _completion(value: Any, name: str, may_be_empty: bool = False) -> str:
    """A completion's text; an empty one is missing, except for a rejected answer (a turn closed
    before answering is a real way to fail, as the built-in set's empty rejections are)."""
    if value is None:
        raise Unusable("missing")
    if not isinstance(value, str):
        raise ValueError(f'field "{name}" must be a string, got {type(value).__name__}')
    if not value.strip() and not may_be_empty:
        raise Unusable("missing")
    return value.strip()


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ValueError(f'field "{name}" must be a list of messages, got {type(value).__name__}')
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in value]


def from_pairs(row: dict) -> dict[str, Any]:
    prompt = _field(row, "prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt.strip()}] if prompt.strip() else []
    triple = {"prompt": _messages(prompt, "prompt"), "chosen": _completion(_field(row, "chosen"), "chosen"),
              "rejected": _completion(_field(row, "rejected"), "rejected", may_be_empty=True)}
    for key in ("chosen_ends_turn", "rejected_ends_turn"):  # what dpo/data/*.jsonl records
        if key in row:
            triple[key] = bool(row[key])
    return triple


def from_messages(row: dict) -> dict[str, Any]:
    chosen, rejected = _messages(_field(row, "chosen"), "chosen"), _messages(_field(row, "rejected"), "rejected")
    if not chosen or not rejected:
        raise Unusable("missing")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
            raise ValueError(f'the last message of "{name}" must be the assistant\'s, got {msgs[-1]!r:.80}')
    if chosen[:-1] != rejected[:-1]:
        raise ValueError('"chosen" and "rejected" differ before their last message: no shared prompt')
    return {"prompt": chosen[:-1], "chosen": _completion(chosen[-1]["content"], "chosen[-1].content"),
            "rejected": _completion(rejected[-1]["content"], "rejected[-1].content", may_be_empty=True)}


def hh_dialogue(text: str) -> list[dict[str, str]]:
    """"\\n\\nHuman: a\\n\\nAssistant: b ..." -> [{user: a}, {assistant: b}, ...]."""
    turns, rest = [], text
    markers = {HH_HUMAN: "user", HH_ASSISTANT: "assistant"}
    while rest:
        found = [(rest.find(m), m) for m in markers if rest.find(m) >= 0]
        if not found:
            if turns:
                turns[-1]["content"] += rest
            elif rest.strip():
                raise ValueError(f"not an HH dialogue: no {HH_HUMAN!r} turn in {text!r:.80}")
            break
        at, marker = min(found)
        if turns:
            turns[-1]["content"] += rest[:at]
        elif rest[:at].strip():
            raise ValueError(f"not an HH dialogue: text before the first turn in {text!r:.80}")
        turns.append({"role": markers[marker], "content": ""})
        rest = rest[at + len(marker):]
    return [{**t, "content": t["content"].strip()} for t in turns]


def split_hh(text: Any, name: str) -> tuple[str, str]:
    """(the dialogue up to the last "\\n\\nAssistant:", the text after it)."""
    if not isinstance(text, str):
        raise ValueError(f'field "{name}" must be a string, got {type(text).__name__}')
    at = text.rfind(HH_ASSISTANT)
    if at < 0:
        raise ValueError(f'field "{name}" has no {HH_ASSISTANT!r} turn')
    return text[:at], text[at + len(HH_ASSISTANT):]


def from_hh(row: dict) -> dict[str, Any]:
    prompt_c, chosen = split_hh(_field(row, "chosen"), "chosen")
    prompt_r, rejected = split_hh(_field(row, "rejected"), "rejected")
    if prompt_c.strip() != prompt_r.strip():
        raise Unusable("prompt_mismatch")
    return {"prompt": hh_dialogue(prompt_c), "chosen": _completion(chosen, "chosen"),
            "rejected": _completion(rejected, "rejected", may_be_empty=True)}


CONVERTERS = {"pairs": from_pairs, "messages": from_messages, "hh": from_hh}


def detect_layout(row: Any) -> str:
    """The layout whose fields the row has."""
    if not isinstance(row, dict) or "chosen" not in row:
        fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f'no "chosen" field (fields: {fields}); a preference row has chosen and rejected')
    chosen = row["chosen"]
    if isinstance(chosen, list):
        return "messages"
    if "prompt" in row:
        return "pairs"
    if isinstance(chosen, str) and HH_ASSISTANT in chosen:
        return "hh"
    raise ValueError('"chosen" is a string but the row has no "prompt" field and no HH dialogue '
                     f"(fields: {', '.join(sorted(row))}); expected one of {', '.join(LAYOUTS)}")


def to_triple(row: Any, layout: str) -> dict[str, Any]:
    """The triple of one row (ValueError: malformed; Unusable: no usable preference)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    triple = CONVERTERS[layout](row)
    texts = [triple["chosen"], triple["rejected"]] + [m.get("content") for m in triple["prompt"]
                                                      if isinstance(m, dict)]
    if any(isinstance(t, str) and tok in t for t in texts for tok in SPECIAL_TOKENS):
        raise Unusable("special_token")
    if triple["prompt"]:
        try:
            validate_messages(triple["prompt"])
        except LLMMakerError as e:
            raise ValueError(f"prompt: {e}") from None
    if triple["chosen"] == triple["rejected"] and triple.get("chosen_ends_turn", True) == \
            triple.get("rejected_ends_turn", True):
        raise Unusable("identical")
    return triple


# --------------------------------------------------------------------------------------
# Sources: a file or hub dataset, or the built-in set
# --------------------------------------------------------------------------------------

def builtin_preferences(seed: int = 0) -> list[dict[str, Any]]:
    """The built-in preference set (see the module docstring): one triple per built-in conversation."""
    convs = builtin_conversations(seed=seed)
    answers = [c["messages"][-1]["content"] for c in convs]
    triples = []
    for i, conv in enumerate(convs):
        answer, ramble, j = answers[i], "", i
        while len(ramble) < RAMBLE_CHARS:  # the next conversations' answers, run together
            j = (j + 1) % len(answers)
            ramble += " " + answers[j]
        cut = ramble[:RAMBLE_CHARS + 1]
        ramble = cut[:cut.rfind(" ")] if " " in cut[1:] else cut[:RAMBLE_CHARS]  # a whole word last
        triples.append({"prompt": conv["messages"][:-1], "chosen": answer, "rejected": answer + ramble.rstrip(),
                        "rejected_ends_turn": False, "kind": conv["kind"], "source": "builtin"})
    return triples


def load_preferences(cfg: PreferenceDataConfig, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The triples of dpo.data (capped at max_pairs) and counts: rows read, kept, dropped by reason."""
    if cfg.source == "builtin":
        triples = builtin_preferences(seed)[:cfg.max_pairs]
        return triples, {"source": "builtin", "rows": len(triples), "kept": len(triples), "dropped": {},
                         "format": "builtin"}
    layout, dropped, rows, triples = cfg.format, Counter(), 0, []
    label = cfg.source if cfg.source.startswith("hf:") else Path(cfg.source).name
    for where, row in iter_rows(cfg.source, cfg.split):
        if cfg.max_pairs is not None and len(triples) >= cfg.max_pairs:
            break
        rows += 1
        try:
            if layout == "auto":
                layout = detect_layout(row)
            triples.append({**to_triple(row, layout), "source": label})
        except Unusable as u:
            dropped[u.reason] += 1
        except ValueError as e:
            raise DataError(f"{where}: {e} (a {layout} preference row)") from None
    return triples, {"source": cfg.source, "rows": rows, "kept": len(triples), "dropped": dict(sorted(dropped.items())),
                     "format": layout}


def preference_signature(cfg: PreferenceDataConfig, seed: int) -> dict[str, Any]:
    """What decides the triples besides dpo.data: the built-in set's seed, a file's bytes, a hub name."""
    if cfg.source == "builtin":
        return {"builtin": builtin_signature(), "seed": seed}
    if cfg.source.startswith("hf:"):
        return {"hub": cfg.source}
    return {"sha256": sha256_file(cfg.source)} if Path(cfg.source).is_file() else {"missing": cfg.source}


def heldout_hash(triple: dict[str, Any], key: str) -> float:
    """A keyed hash of the pair's prompt in [0, 1): every pair of one prompt lands on the same side."""
    return unit_hash(json.dumps(triple["prompt"], sort_keys=True, ensure_ascii=False), hash_key(key), HELDOUT_PERSON)


def split_pairs(triples: Sequence[dict[str, Any]], fraction: float,
                key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, heldout): a pair is held out iff its prompt's keyed hash is below `fraction` (order kept)."""
    train, heldout = [], []
    for t in triples:
        (heldout if heldout_hash(t, key) < fraction else train).append(t)
    return train, heldout


# --------------------------------------------------------------------------------------
# Encoding and batches
# --------------------------------------------------------------------------------------

class EncodedPair(NamedTuple):
    chosen: EncodedConversation  # prompt + chosen completion; labels on the completion only
    rejected: EncodedConversation


def encode_completion(tokenizer: Tokenizer, prompt: list[int], text: str, template: str,
                      ends_turn: bool = True) -> EncodedConversation:
    """prompt + the completion's ids (+ the template's end token when it ends its turn): the
    sequence encode_chat gives for the whole conversation, labelled on the final answer only."""
    completion = tokenizer.encode(text.strip())
    if ends_turn:
        completion.append(tokenizer.token_id(template_spec(template).end_token))
    return EncodedConversation(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)


def encode_pairs(tokenizer: Tokenizer, triples: Sequence[dict[str, Any]], template: str,
                 max_len: int) -> tuple[list[EncodedPair], dict[str, Any]]:
    """Encode every triple; drop (and count) a pair that does not fit `max_len` tokens, and apart
    from those, one whose prompt alone leaves no room for a completion token."""
    encoded: list[EncodedPair] = []
    too_long = prompt_too_long = longest = tokens = 0
    for t in triples:
        prompt = prompt_ids(tokenizer, t["prompt"], template)
        if len(prompt) >= max_len:  # prompt > model.seq_len: not one completion token fits
            prompt_too_long += 1
            continue
        pair = EncodedPair(encode_completion(tokenizer, prompt, t["chosen"], template, t.get("chosen_ends_turn", True)),
                           encode_completion(tokenizer, prompt, t["rejected"], template,
                                             t.get("rejected_ends_turn", True)))
        if max(len(pair.chosen.ids), len(pair.rejected.ids)) > max_len:
            too_long += 1
            continue
        encoded.append(pair)
        longest = max(longest, len(pair.chosen.ids), len(pair.rejected.ids))
        tokens += len(pair.chosen.ids) + len(pair.rejected.ids)
    stats = {"pairs": len(triples), "kept": len(encoded), "dropped_too_long": too_long,
             "dropped_prompt_too_long": prompt_too_long, "max_len": max_len, "longest": longest, "tokens": tokens}
    return encoded, stats


def pair_seq_len(*sets: Sequence[EncodedPair]) -> int:
    """T of every batch: the longest chosen or rejected sequence of all the sets, minus the shift."""
    return max(len(s.ids) for pairs in sets for p in pairs for s in p) - 1


def pad_pairs(items: Sequence[EncodedPair], length: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """(chosen x, chosen y, rejected x, rejected y), each (B, length): one length, so that chosen
    and rejected go through the model in one forward."""
    xc, yc = pad_batch([p.chosen for p in items], length, pad_id)
    xr, yr = pad_batch([p.rejected for p in items], length, pad_id)
    return xc, yc, xr, yr


class DPOBatches:
    """Shuffled pair micro-batches (the trainer's batch protocol), as SFTBatches: sample s is pair
    perm_e[s mod n] with perm_e from random.Random(seed + e). A micro-batch is
    (chosen x, chosen y, rejected x, rejected y, ref chosen log-prob, ref rejected log-prob);
    `val_batches` yields the held-out pairs alike, in order (the trainer's val_loss is the
    chosen completions' cross-entropy). `ref` / `val_ref`: (n, 2) float tensors, chosen and rejected."""

    def __init__(self, encoded: Sequence[EncodedPair], ref: torch.Tensor, micro_batch_size: int, pad_id: int,
                 seed: int, val_encoded: Sequence[EncodedPair] = (), val_ref: Optional[torch.Tensor] = None):
        if not encoded:
            raise DataError("no preference pairs to train on (all were dropped or the set is empty)")
        if len(ref) != len(encoded) or (val_encoded and (val_ref is None or len(val_ref) != len(val_encoded))):
            raise ValueError("one reference log-prob pair per preference pair is needed")
        self.encoded, self.val_encoded = list(encoded), list(val_encoded)
        self.ref, self.val_ref = ref.float(), (val_ref.float() if val_ref is not None else torch.zeros(0, 2))
        self.batch_size, self.pad_id, self.seed = micro_batch_size, pad_id, seed
        self.seq_len = pair_seq_len(self.encoded, self.val_encoded)
        self.tokens_per_micro_batch = 2 * micro_batch_size * self.seq_len
        self._order = EpochOrder(len(self.encoded), seed)

    def _permutation(self, epoch: int) -> list[int]:
        return self._order(epoch)

    def item_ids(self, index: int) -> list[int]:
        out = []
        for s in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, pos = divmod(s, len(self.encoded))
            out.append(self._permutation(epoch)[pos])
        return out

    def epoch_of(self, index: int) -> float:
        return (index + 1) * self.batch_size / len(self.encoded)

    def _batch(self, pairs: Sequence[EncodedPair], ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (*pad_pairs(pairs, self.seq_len, self.pad_id), ref[:, 0].contiguous(), ref[:, 1].contiguous())

    def micro_batch(self, index: int) -> tuple[torch.Tensor, ...]:
        ids = self.item_ids(index)
        return self._batch([self.encoded[i] for i in ids], self.ref[ids])

    def val_batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, len(self.val_encoded), self.batch_size):
            end = start + self.batch_size
            yield self._batch(self.val_encoded[start:end], self.val_ref[start:end])
