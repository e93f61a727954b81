"""Caption stage: training images → one caption each (BLIP-2) → the captions JSONL encode reads. Entry point:
``driver.run_caption``."""
