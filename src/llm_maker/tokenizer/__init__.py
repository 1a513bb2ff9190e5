"""Byte-level BPE tokenizer: train with `tokenizers`, or load a pretrained tokenizer.json."""
