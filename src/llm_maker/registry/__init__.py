"""Reporting runs: the registry table of every model (REGISTRY.md) and each run's model card
(card.md) with its training curves (plots/*.png)."""
from llm_maker.registry.card import write_card
from llm_maker.registry.registry import scan_run, scan_runs, write_registry

__all__ = ["scan_run", "scan_runs", "write_card", "write_registry"]
