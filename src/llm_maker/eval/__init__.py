"""The eval stage: validation loss, the base-vs-SFT stop table, exact match, report.json/report.md."""
from llm_maker.eval.evaluate import run_eval, validation_loss
from llm_maker.eval.report import render_markdown, write_report

__all__ = ["render_markdown", "run_eval", "validation_loss", "write_report"]
