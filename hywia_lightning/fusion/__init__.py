"""HyWIA: several granularities fused per group (the scorer), the learnable fusion attention, and how it trains."""
