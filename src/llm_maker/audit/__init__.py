"""Contamination audit: token n-gram overlap between what a run trained on and evaluation sets."""
