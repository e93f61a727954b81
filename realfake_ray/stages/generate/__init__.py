"""Generate stage: latent bank + LoRA → synthetic set. Entry point: ``driver.run_generate``."""
