"""The data stage: read corpus sources, select and split documents, write train/val JSON Lines."""
