"""Supervised fine-tuning: chat templates, the built-in instruction set, completion-only batches, the stage."""
from llm_maker.sft.builtin import builtin_conversations
from llm_maker.sft.dataset import (EncodedConversation, SFTBatches, encode_conversations, load_conversations,
                                   split_heldout)
from llm_maker.sft.stage import run_sft
from llm_maker.sft.templates import (IGNORE_INDEX, encode_chat, jinja_chat_template, prompt_ids, stop_token_ids,
                                     validate_messages)

__all__ = ["IGNORE_INDEX", "EncodedConversation", "SFTBatches", "builtin_conversations", "encode_chat",
           "encode_conversations", "jinja_chat_template", "load_conversations", "prompt_ids", "run_sft",
           "split_heldout", "stop_token_ids", "validate_messages"]
