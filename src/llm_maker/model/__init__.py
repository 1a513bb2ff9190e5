"""The Llama-style decoder, its presets and its parameter count."""
