"""Generation with the KV cache (streaming, greedy or sampled) and the terminal chat."""
