"""``realfake filter-synthetic``: keep the synthetic images a classifier trained on real images labels as their class."""
