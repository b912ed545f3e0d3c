"""LoRA recovery of a pruned model: the adapters (peft) and the LightningModule that trains them."""
