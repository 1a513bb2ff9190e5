"""The pack stage: token ids of each split in bounded shard files, read back as memory maps."""
from llm_maker.pack.packer import choose_dtype, documents_to_tokens, load_split, pack_tokens, unigram_loss
from llm_maker.pack.shards import ShardedTokens

__all__ = ["ShardedTokens", "choose_dtype", "documents_to_tokens", "load_split", "pack_tokens", "unigram_loss"]
