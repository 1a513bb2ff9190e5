"""Supervised fine-tuning: chat templates, the built-in instruction set, completion-only batches, the stage."""
