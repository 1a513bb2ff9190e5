"""Export to and import from the Hugging Face ecosystem: transformers directories, GGUF, model cards."""
