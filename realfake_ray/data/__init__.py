"""Real datasets: the embedded digits set and the ImageFolder reader (no Ray imports)."""
