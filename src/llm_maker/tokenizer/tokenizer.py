"""A thin wrapper over a `tokenizers` byte-level BPE with llm-maker's special tokens.

Special tokens (ids 0-3 in a tokenizer trained here):
  <|endoftext|>  end of a document in pretraining; the stop token of the parchment template
  <|pad|>        padding, distinct from EOS so SFT can teach the model to stop; a pretrained
                 tokenizer may pad with a token of its own instead (`with_special_tokens(pad_token=)`),
                 which tokenizer.json then names in its standard "padding" field
  <|im_start|>   ChatML turn start
  <|im_end|>     ChatML turn end (the stop token of the chatml template)
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llm_maker.artifacts import atomic_write_text, sha256_bytes
from llm_maker.errors import LLMMakerError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """Encode/decode text; knows its special-token ids and a content hash."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        self.hf = hf
        self.source = source
        self.hash = sha256_bytes(hf.to_str().encode("utf-8"))[:16]
        padding = hf.padding
        self.pad_token = padding["pad_token"] if padding else PAD
        if padding:  # only the pad's name is wanted: llm-maker pads its own batches (sft/dataset.py)
            hf.no_padding()
        missing = [t for t in (EOS, self.pad_token, IM_START, IM_END) if hf.token_to_id(t) is None]
        if missing:
            raise LLMMakerError(f"{source}: tokenizer lacks special tokens {missing}")
        self.eos_id = hf.token_to_id(EOS)
        self.pad_id = hf.token_to_id(self.pad_token)
        self.im_start_id = hf.token_to_id(IM_START)
        self.im_end_id = hf.token_to_id(IM_END)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load `path/tokenizer.json` (or a tokenizer.json file itself)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise LLMMakerError(f"{file}: tokenizer file not found")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise LLMMakerError(f"{file}: not a valid tokenizer.json: {e}") from None
        return cls(hf, source=str(file))

    def _file_form(self) -> HFTokenizer:
        """A copy as tokenizer.json holds it: with the "padding" field naming a pad of its own."""
        hf = HFTokenizer.from_str(self.hf.to_str())
        if self.pad_token != PAD:
            hf.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token)
        return hf

    def save(self, directory: str | Path) -> Path:
        out = Path(directory) / TOKENIZER_FILE
        atomic_write_text(out, self._file_form().to_str(pretty=True))
        return out

    def as_plain_text(self) -> "Tokenizer":
        """A copy that encodes special-token strings found in text as ordinary text, so a document
        that merely mentions "<|endoftext|>" cannot inject an end-of-document token (packing uses it;
        the flag is not part of tokenizer.json, so the hash is unchanged)."""
        hf = self._file_form()
        hf.encode_special_tokens = True
        return Tokenizer(hf, source=self.source)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> Optional[int]:
        return self.hf.token_to_id(token)

    @property
    def special_token_ids(self) -> dict[str, int]:
        """{token: id} of the special tokens in use, the pad under its own name (for manifests)."""
        return {EOS: self.eos_id, self.pad_token: self.pad_id, IM_START: self.im_start_id, IM_END: self.im_end_id}


def new_bpe_tokenizer() -> HFTokenizer:
    """An untrained byte-level BPE (GPT-2 style pre-tokenisation, no <unk> ever needed)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE; the special tokens take ids 0..3."""
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def with_special_tokens(hf: HFTokenizer, pad_token: Optional[str] = None) -> HFTokenizer:
    """Add any missing llm-maker special tokens to a pretrained tokenizer (ids appended).

    `pad_token`: pad with this token of the tokenizer's own instead of adding <|pad|> (a row the
    model would otherwise grow by: SmolLM2 pads with <|im_end|>, ParchmentLM with <|endofprompt|>).
    Padded positions are never trained on, so the pad may be any token, even the stop token."""
    if pad_token is not None:
        pad_id = hf.token_to_id(pad_token)
        if pad_id is None:
            raise LLMMakerError(f"tokenizer.pad_token: {pad_token!r} is not a token of this tokenizer")
        hf.enable_padding(pad_id=pad_id, pad_token=pad_token)
    wanted = [t for t in SPECIAL_TOKENS if not (pad_token is not None and t == PAD)]
    missing = [t for t in wanted if hf.token_to_id(t) is None]
    if missing:
        hf.add_special_tokens(missing)
    return hf
