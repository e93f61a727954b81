"""``realfake tune-sampler``: ``driver`` (the Ray Tune sweep) and ``grid`` (grid, Pareto front, recommendation)."""
