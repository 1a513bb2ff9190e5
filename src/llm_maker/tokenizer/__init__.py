"""Byte-level BPE tokenizer: train with `tokenizers`, or load a pretrained tokenizer.json."""
from llm_maker.tokenizer.tokenizer import (EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS, Tokenizer,
                                           train_bpe)
from llm_maker.tokenizer.stage import build_tokenizer, bytes_per_token, load_pretrained

__all__ = ["EOS", "IM_END", "IM_START", "PAD", "SPECIAL_TOKENS", "Tokenizer", "build_tokenizer",
           "bytes_per_token", "load_pretrained", "train_bpe"]
