"""The pack stage: token ids of each split in one flat binary file, read back as a memory map."""
from llm_maker.pack.packer import choose_dtype, documents_to_tokens, load_split, pack_tokens, unigram_loss

__all__ = ["choose_dtype", "documents_to_tokens", "load_split", "pack_tokens", "unigram_loss"]
