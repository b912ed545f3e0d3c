"""How ranks talk (collectives, local process groups), sharded sums and models (FSDP2), strategies."""
