"""Layer-wise least-squares reconstruction of pruned output projections, and when its moments are taken (modes)."""
