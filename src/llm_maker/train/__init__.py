"""Training: the shared loop (trainer), schedule, batches, checkpoints, and the pretraining stage."""
