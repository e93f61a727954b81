"""Train stage: synthetic / real / mixed images → classifier. Entry point: ``driver.run_train``."""
