"""The Llama-style decoder, its presets and its parameter count."""
from llm_maker.model.llama import BatchKVCache, KVCache, LlamaConfig, LlamaModel, count_parameters
from llm_maker.model.presets import PRESETS, resolve_model_config

__all__ = ["BatchKVCache", "KVCache", "LlamaConfig", "LlamaModel", "count_parameters", "PRESETS", "resolve_model_config"]
