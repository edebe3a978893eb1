"""LoRA adapters: folded into their base as it is read, combined into one adapter, or merged as models."""
