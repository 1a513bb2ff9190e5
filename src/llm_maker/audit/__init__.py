"""Contamination audit: token n-gram overlap between what a run trained on and evaluation sets."""
from llm_maker.audit.contamination import audit_markdown, audit_run, read_eval_set, write_audit
from llm_maker.audit.ngrams import EvalNgrams, ngram_hashes

__all__ = ["EvalNgrams", "audit_markdown", "audit_run", "ngram_hashes", "read_eval_set", "write_audit"]
