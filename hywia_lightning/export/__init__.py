"""A pruned model as a self-contained Hugging Face folder (with its modeling code) or a GGUF file."""
