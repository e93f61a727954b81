"""Tools on top of a run: the sampler benchmark and tuning, the privacy audit, the report, FLOP counts."""
