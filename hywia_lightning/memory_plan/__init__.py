"""Each stage's peak memory per rank by arithmetic, from a job's config, before any weight loads. Imports no Lightning."""
