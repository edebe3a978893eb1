"""mergekit's refusal to mix architectures ("crimes") unless run with ``--allow-crimes``.

mergekit 0.1.5 maps each input's config.json ``architectures[0]`` to one of its architecture
definitions and refuses when the definitions differ. A name it has no definition for makes it
infer the layout from tensor names instead, without this check, so only known names are compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streammerge.errors import CheckpointError

# The architecture names mergekit 0.1.5 has a definition for (mergekit/_data/architectures, plus
# its two MoE definitions built in code).
KNOWN_ARCHITECTURES = frozenset((
    "AfmoeForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM", "BaichuanForCausalLM", "BertForMaskedLM",
    "BertForMultipleChoice", "BertForSequenceClassification", "BertForTokenClassification", "BertModel",
    "ChatGLMModel", "Cohere2ForCausalLM", "CohereForCausalLM", "DistilBertForMaskedLM",
    "DistilBertForSequenceClassification", "DistilBertForTokenClassification", "DistilBertModel",
    "ExaoneForCausalLM", "FalconForCausalLM", "GPT2ForSequenceClassification", "GPT2LMHeadModel",
    "GPTBigCodeForCausalLM", "GPTNeoXForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration", "GemmaForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM",
    "GraniteForCausalLM", "GraniteMoeHybridForCausalLM", "InternLM2ForCausalLM", "JAISLMHeadModel",
    "LLaMaForCausalLM", "Lfm2ForCausalLM", "Llama4ForConditionalGeneration", "LlamaForCausalLM",
    "LlamaForSequenceClassification", "MambaForCausalLM", "Mistral3ForConditionalGeneration",
    "MistralForCausalLM", "MixFormerSequentialForCausalLM", "MixtralForCausalLM", "Olmo2ForCausalLM",
    "Phi3ForCausalLM", "Phi3SmallForCausalLM", "PhiForCausalLM", "QWenLMHeadModel", "Qwen2ForCausalLM",
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM", "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
    "RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaForTokenClassification",
    "RobertaModel", "SolarForCausalLM", "StableLMEpochForCausalLM", "StableLmForCausalLM",
    "Starcoder2ForCausalLM", "T5ForConditionalGeneration", "WhisperForConditionalGeneration",
    "_AfmoePartialForCausalLM",
))
# Names that share one definition, and the one name whose definition depends on model_type
# (a model_type neither definition expects makes mergekit infer, as for an unknown name).
_SAME_DEFINITION = {"LLaMaForCausalLM": "LlamaForCausalLM",
                    "BertForMultipleChoice": "BertForSequenceClassification",
                    "BertForTokenClassification": "BertForSequenceClassification"}
_BY_MODEL_TYPE = {"PhiForCausalLM": ("phi", "phi-msft")}


def definition(config: dict[str, Any]) -> str | None:
    """The mergekit architecture definition a config.json selects, or None where mergekit infers one."""
    names = config.get("architectures")
    if not isinstance(names, list) or len(names) != 1 or names[0] not in KNOWN_ARCHITECTURES:
        return None
    name = names[0]
    if name in _BY_MODEL_TYPE:
        model_type = config.get("model_type")
        return f"{name} ({model_type})" if model_type in _BY_MODEL_TYPE[name] else None
    return _SAME_DEFINITION.get(name, name)


def check_architectures(models: Sequence[str], configs: Sequence[dict[str, Any]], allowed: bool) -> None:
    """Refuse ``models`` (plan references) whose ``configs`` name different architectures, unless
    ``allowed``."""
    found = [definition(c) for c in configs]
    if allowed or None in found or len(set(found)) < 2:
        return
    listed = ", ".join(f"{m} ({c['architectures'][0]})" for m, c in zip(models, configs))
    raise CheckpointError(f"inputs of different architectures: {listed}; mergekit refuses to mix them: "
                          "add --allow-crimes (or 'allow_crimes: true' in the plan) to merge them anyway")
