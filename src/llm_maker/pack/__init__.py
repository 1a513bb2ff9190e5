"""The pack stage: token ids of each split in bounded shard files, read back as memory maps."""
