"""The files that make the shards a Hugging Face model: index, config, tokenizer and model card."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import yaml

from streammerge.io.layout import BUILT_TOKENIZER_COMPANIONS, INDEX, TOKENIZER_FILES
from streammerge.io.writer import StagedOutput
from streammerge.plan.architecture import TIED_HEADS, is_pre_layer, is_vocab_tensor
from streammerge.plan.load import PlanWarning
from streammerge.plan.schema import EXECUTION_KEYS
from streammerge.schedule import Schedule
from streammerge.tokenizer.vocab import added_tokens_decoder

def write_model_files(schedule: Schedule, staged: StagedOutput, version: str) -> None:
    if len(schedule.shards) > 1:
        staged.write_json(INDEX, {
            "metadata": {"total_size": sum(j.out_bytes for j in schedule.jobs), "streammerge_version": version},
            "weight_map": {name: s.filename for s in schedule.shards for name in s.tensors},
        })
    ref = schedule.checkpoints[schedule.reference]
    config = ref.config()
    if schedule.plan.modules is not None:
        for key, n in schedule.module_layers:
            *parents, last = key.split(".")
            section = config
            for part in parents:
                section = section.setdefault(part, {})
            section[last] = n
    elif "num_hidden_layers" in config or schedule.plan.slices is not None:
        config["num_hidden_layers"] = schedule.num_layers  # slices may stack or drop layers
    shapes = {j.name: j.shape for j in schedule.jobs}
    vocab = next((shapes[n][0] for n in shapes if is_vocab_tensor(n) and is_pre_layer(n)), None)
    for section in (config, config.get("text_config")):
        if vocab is not None and isinstance(section, dict) and "vocab_size" in section:
            section["vocab_size"] = vocab
    if config.get("tie_word_embeddings") and any(h in shapes for h in TIED_HEADS):
        config["tie_word_embeddings"] = False  # an untied input's head was kept
    out_dtypes = {str(j.out_dtype).removeprefix("torch.") for j in schedule.jobs if j.method is not None}
    if len(out_dtypes) == 1:
        config["torch_dtype"] = out_dtypes.pop()
        if "dtype" in config:  # transformers 5 writes `dtype` instead
            config["dtype"] = config["torch_dtype"]
    staged.write_json("config.json", config)
    write_tokenizer_files(schedule, staged)
    if schedule.plan.write_model_card:
        staged.write_text("README.md", model_card(schedule, version))


def write_tokenizer_files(schedule: Schedule, staged: StagedOutput) -> None:
    """A built tokenizer (tokenizer.json, and the donor's tokenizer_config.json with the output's
    added tokens), else the donor's tokenizer files verbatim; then the chat template, if the plan
    sets one, in tokenizer_config.json and chat_template.jinja. Without ``copy_tokenizer`` a plan
    that builds no tokenizer gets no tokenizer files, nor its chat template (as with mergekit's
    --no-copy-tokenizer)."""
    plan, vocab, template = schedule.plan, schedule.vocabulary, schedule.chat_template
    if vocab is None and not plan.copy_tokenizer:
        if template is not None:
            warnings.warn("chat_template: not written: the plan builds no tokenizer and copy_tokenizer is "
                          "off (--no-copy-tokenizer); add 'tokenizer_source: base' to write it", PlanWarning,
                          stacklevel=2)
        return
    if vocab is not None:
        donor, files = vocab.donor, BUILT_TOKENIZER_COMPANIONS
    else:
        donor, files = (Path(plan.tokenizer_source) if plan.tokenizer_source not in (None, "base")
                        else schedule.checkpoints[schedule.reference].path), TOKENIZER_FILES
    rewritten = {"tokenizer_config.json", "chat_template.jinja", "chat_template.json"} if template else set()
    for name in files:
        if name not in rewritten and (donor / name).is_file():
            staged.copy_in(donor / name)
    if vocab is None and template is None:
        return
    config_file = donor / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if vocab is not None:
        staged.write_text("tokenizer.json", vocab.tokenizer_json)
        config["added_tokens_decoder"] = added_tokens_decoder(vocab.tokenizer_json)
    if template is not None:
        config["chat_template"] = template
        staged.write_text("chat_template.jinja", template)
    staged.write_json("tokenizer_config.json", config)


def _fingerprint(path: Path) -> str:
    """sha256 over the checkpoint's shard headers and sizes (cheap: no tensor data is read)."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def model_card(schedule: Schedule, version: str) -> str:
    plan = schedule.plan
    meta = {"base_model": [plan.base_model] if plan.base_model else [], "library_name": "transformers", "tags": ["merge", "streammerge"]}
    # Without where it was written to or how it ran: neither changes a byte of the model.
    plan_yaml = yaml.safe_dump(plan.model_dump(mode="json", exclude_none=True,
                                               exclude={"output", *EXECUTION_KEYS}), sort_keys=False)
    inputs = "\n".join(f"- `{c.path}` (header sha256 {_fingerprint(c.path)})" for c in schedule.checkpoints)
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        f"# Merged model\n\n"
        f"Merged with streammerge {version} using `{plan.merge_method}`"
        + (f", base model `{plan.base_model}`" if plan.base_model else "")
        + ".\n\n## Inputs\n\n" + inputs + "\n\n## Plan\n\n```yaml\n" + plan_yaml + "```\n"
    )
