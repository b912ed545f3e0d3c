"""HyWIA: several granularities fused per group (a granularity of granularities), the learnable fusion attention, and how it trains."""
