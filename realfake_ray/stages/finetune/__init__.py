"""Fine-tune stage: latent bank → distribution-matching LoRA. Entry point: ``driver.run_finetune``."""
