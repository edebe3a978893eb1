"""The output tokenizer: vocabulary (union, base or a model's), embedding row maps, chat templates."""
