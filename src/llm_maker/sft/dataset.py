"""SFT data: read conversations, split off a held-out set, encode them, serve padded batches.

Conversations longer than the model's context are dropped and counted, never truncated: a
cut conversation would teach answers that stop mid-sentence or never reach the end token.
`SFTBatches` follows the trainer's batch protocol (see train/trainer.py): a micro-batch is a
pure function of its index, so resuming needs only the step count.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import torch

from llm_maker.artifacts import iter_jsonl_rows
from llm_maker.data.select import hash_key, unit_hash
from llm_maker.errors import DataError, LLMMakerError
from llm_maker.sft.templates import IGNORE_INDEX, encode_chat, validate_messages
from llm_maker.tokenizer.tokenizer import Tokenizer

HELDOUT_PERSON = b"llm-maker:sft"  # BLAKE2b personalisation: independent of the data stage's coins


class EncodedConversation(NamedTuple):
    ids: list[int]  # (T,)
    labels: list[int]  # (T,) ids on supervised positions, IGNORE_INDEX elsewhere


def load_conversations(path: str | Path, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Rows of a .jsonl file, each {"messages": [...], ...}; blank lines are skipped.

    `allow_empty`: an empty file is fine (sft/data/heldout.jsonl when heldout_fraction is 0)."""
    convs = []
    for where, row in iter_jsonl_rows(path, "SFT data file"):
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f'{where}: expected an object with a "messages" list')
        try:
            validate_messages(row["messages"])
        except LLMMakerError as e:
            raise DataError(f"{where}: {e}") from None
        convs.append(row)
    if not convs and not allow_empty:
        raise DataError(f"{path}: no conversations")
    return convs


def heldout_hash(conv: dict[str, Any], key: str) -> float:
    """A keyed hash of the conversation's messages in [0, 1): the same on every machine."""
    text = json.dumps(conv["messages"], sort_keys=True, ensure_ascii=False)
    return unit_hash(text, hash_key(key), HELDOUT_PERSON)


def split_heldout(convs: Sequence[dict[str, Any]], fraction: float,
                  key: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, heldout): a conversation is held out iff its keyed hash is below `fraction`.

    Order is kept within each part; identical conversations always land on the same side."""
    train, heldout = [], []
    for conv in convs:
        (heldout if heldout_hash(conv, key) < fraction else train).append(conv)
    return train, heldout


def encode_conversations(tokenizer: Tokenizer, convs: Sequence[dict[str, Any]], template: str,
                         max_len: int) -> tuple[list[EncodedConversation], dict[str, Any]]:
    """Encode every conversation; drop (and count) those over `max_len` tokens or with nothing
    to learn (no assistant turn). Stats count tokens of the kept conversations only."""
    encoded: list[EncodedConversation] = []
    dropped_too_long = dropped_unsupervised = tokens = supervised = longest = 0
    for conv in convs:
        ids, labels = encode_chat(tokenizer, conv["messages"], template)
        n_supervised = sum(1 for t in labels if t != IGNORE_INDEX)
        if len(ids) > max_len:
            dropped_too_long += 1
            continue
        if n_supervised == 0:
            dropped_unsupervised += 1
            continue
        encoded.append(EncodedConversation(ids, labels))
        tokens += len(ids)
        supervised += n_supervised
        longest = max(longest, len(ids))
    stats = {
        "conversations": len(convs),
        "kept": len(encoded),
        "dropped_too_long": dropped_too_long,
        "dropped_no_assistant": dropped_unsupervised,
        "max_len": max_len,
        "longest": longest,
        "tokens": tokens,
        "supervised_tokens": supervised,
        "supervised_fraction": round(supervised / tokens, 6) if tokens else 0.0,
    }
    return encoded, stats


class EpochOrder:
    """The order in which an epoch visits n items: a fresh shuffle per epoch, from
    random.Random(seed + epoch), the last one kept (a micro-batch is a pure function of its index)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._order = -1, []

    def __call__(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(self.n))
            random.Random(self.seed + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order


def pad_batch(items: Sequence[EncodedConversation], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to `length` + 1 tokens and shift: x = ids[:-1], y = labels[1:], both (B, length).

    Padding is pad_id in x (never EOS, which the model must learn to emit) and IGNORE_INDEX in y;
    with right padding and causal attention, real tokens never see a pad."""
    ids = torch.full((len(items), length + 1), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length + 1), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item.ids)] = torch.tensor(item.ids, dtype=torch.long)
        labels[row, : len(item.labels)] = torch.tensor(item.labels, dtype=torch.long)
    return ids[:, :-1], labels[:, 1:]


class SFTBatches:
    """Shuffled, padded micro-batches of encoded conversations (the trainer's batch protocol).

    Sample s of the stream is conversation perm_e[s mod n] with e = s // n and perm_e drawn by
    random.Random(seed + e): every conversation once per epoch, a fresh order each epoch, and
    micro-batch `index` of rank r holds samples (index * W + r) * B ... + B - 1, as in
    PretrainBatches. Every batch is padded to the longest conversation of the whole set, so
    shapes are static (compile-friendly) and `tokens_per_micro_batch` is exact.
    """

    def __init__(self, encoded: Sequence[EncodedConversation], micro_batch_size: int, pad_id: int, seed: int,
                 val_encoded: Optional[Sequence[EncodedConversation]] = None, rank: int = 0, world_size: int = 1):
        if not encoded:
            raise DataError("no SFT conversations to train on (all were dropped or the set is empty)")
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        self.encoded, self.val_encoded = list(encoded), list(val_encoded or [])
        self.batch_size, self.pad_id, self.seed = micro_batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.seq_len = max(len(e.ids) for e in self.encoded + self.val_encoded) - 1  # T of x and y
        self.tokens_per_micro_batch = micro_batch_size * self.seq_len
        self.batches_per_epoch = max(1, len(self.encoded) // (micro_batch_size * world_size))
        self._order = EpochOrder(len(self.encoded), seed)

    def _permutation(self, epoch: int) -> list[int]:
        return self._order(epoch)

    def item_ids(self, index: int) -> list[int]:
        """Conversation indices of micro-batch `index` for this rank."""
        start = (index * self.world_size + self.rank) * self.batch_size
        out = []
        for s in range(start, start + self.batch_size):
            epoch, pos = divmod(s, len(self.encoded))
            out.append(self._permutation(epoch)[pos])
        return out

    def epoch_of(self, index: int) -> float:
        return (index + 1) * self.world_size * self.batch_size / len(self.encoded)

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (B, T) LongTensors on the CPU."""
        return pad_batch([self.encoded[i] for i in self.item_ids(index)], self.seq_len, self.pad_id)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out conversations in order, B at a time (the last batch may be smaller)."""
        for start in range(0, len(self.val_encoded), self.batch_size):
            yield pad_batch(self.val_encoded[start:start + self.batch_size], self.seq_len, self.pad_id)
