"""``realfake export``: the sharded synthetic set written as an ImageFolder or WebDataset tars (``driver`` on Ray,
``writers`` the per-shard writing)."""
