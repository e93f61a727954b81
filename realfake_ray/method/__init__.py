"""Pure torch/diffusers logic of the method: losses, the vision guidance token, prompts, the sampler, LoRA,
sampler speed-ups, the classifier, metrics, CLIP embeddings. Nothing here imports Ray."""
