"""Encode stage: real dataset → latent bank. Entry point: ``driver.run_encode``."""
