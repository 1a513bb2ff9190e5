"""The data stage: read corpus sources, select and split documents, write train/val JSON Lines."""
from llm_maker.data.builtin import builtin_documents, pydoc_topics, stdlib_docstrings
from llm_maker.data.select import SelectionCounts, select_documents, split_of, unit_hash
from llm_maker.data.sources import Document, iter_documents
from llm_maker.data.stage import iter_split, iter_split_batches, prepare_data, source_signature

__all__ = [
    "Document", "SelectionCounts", "builtin_documents", "iter_documents", "iter_split", "iter_split_batches",
    "prepare_data", "pydoc_topics", "select_documents", "source_signature", "split_of", "stdlib_docstrings",
    "unit_hash",
]
