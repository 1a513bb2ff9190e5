"""Reporting runs: the registry table of every model (REGISTRY.md) and each run's model card
(card.md) with its training curves (plots/*.png)."""
