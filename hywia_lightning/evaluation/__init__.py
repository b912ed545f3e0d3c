"""Perplexity, zero-shot accuracy through lm-eval, the dense baseline, FLOPs and throughput."""
