"""File names of a Hugging Face model directory besides the weights."""

INDEX = "model.safetensors.index.json"

# Copied verbatim from the tokenizer donor, as mergekit does.
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "added_tokens.json",
    "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)

# Kept from the donor beside a built tokenizer.json (whose tokenizer_config.json is rewritten).
BUILT_TOKENIZER_COMPANIONS = ("special_tokens_map.json", "generation_config.json", "chat_template.jinja")
