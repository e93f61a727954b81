"""Evaluate stage: classifier → accuracy and distribution metrics. Entry point: ``driver.run_evaluate``."""
