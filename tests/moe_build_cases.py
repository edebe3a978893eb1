"""The mergekit-moe configs of tests/test_moe_build.py and scripts/make_moe_goldens.py, over tiny
dense stand-ins from ``arch_builder.build_model`` (seed 0 is the base, seeds 1.. the experts).

Each case builds its models into a directory of its own and writes a config naming them there; the
goldens (tests/data/golden_moe_build/<case>) hold what mergekit-moe 0.1.5 made of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from arch_builder import build_model

GOLDEN = Path(__file__).parent / "data" / "golden_moe_build"
# prompts in the stand-ins' word vocabulary (arch_builder.WORDS)
PROMPTS = [
    ["the river stone", "water light of the house"],
    ["people work long", "years of good work"],
    ["he said that she was there", "they were all here"],
    ["first time new man", "great old year"],
]
NEGATIVE = [["house of men"], None, ["the world"], None]


@dataclass(frozen=True)
class Case:
    """``experts`` dense fine-tunes (and ``shared`` shared experts) of a ``family`` base."""

    name: str
    family: str
    gate_mode: str
    experts: int = 3
    shared: int = 0
    shared_prompts: bool = False
    dtype: str | None = "float32"
    architecture: str | None = None
    seed: int | None = None  # mergekit-moe --random-seed, streammerge --seed
    extra: dict = field(default_factory=dict)  # per-expert keys for expert 1 (noise, residual)
    output_type: str = "mixtral"  # the output's model_type

    def models(self, root: Path) -> tuple[Path, list[Path]]:
        """The base and one model per expert, built under ``root``."""
        base = build_model(root / "m0", self.family, seed=0)
        return base, [
            build_model(root / f"m{k}", self.family, seed=k) for k in range(1, self.experts + 1)
        ]

    def config(self, root: Path) -> Path:
        """The models and the config file, under ``root``; returns the config's path."""
        base, others = self.models(root)
        experts = []
        for k, path in enumerate(others):
            e = {"source_model": str(path), "positive_prompts": PROMPTS[k % 4]}
            if NEGATIVE[k % 4]:
                e["negative_prompts"] = NEGATIVE[k % 4]
            experts.append(e | (self.extra if k == 1 else {}))
        doc = {"base_model": str(base), "gate_mode": self.gate_mode, "experts": experts}
        if (
            self.shared
        ):  # the base: mergekit-moe 0.1.5 opens only the base's and the experts' models
            doc["shared_experts"] = [
                {"source_model": str(base)}
                | ({"positive_prompts": PROMPTS[3]} if self.shared_prompts else {})
                for _ in range(self.shared)
            ]
        if self.dtype:
            doc["dtype"] = self.dtype
        if self.architecture:
            doc["architecture"] = self.architecture
        path = root / "moe.yml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path


CASES = {
    c.name: c
    for c in (
        Case("llama_cheap_embed", "llama", "cheap_embed", extra={"residual_scale": 0.5}),
        Case("mistral_random", "mistral", "random", experts=2, dtype="bfloat16", seed=7),
        Case("llama_uniform_random", "llama", "uniform_random", experts=2, seed=3),
        Case("llama_hidden", "llama", "hidden"),
        Case("mistral_hidden_avg", "mistral", "hidden_avg", experts=2, dtype="bfloat16"),
        # seeded so that the golden is reproducible: mergekit draws the noise after its seed
        Case("llama_noise", "llama", "cheap_embed", experts=2, seed=5, extra={"noise_scale": 0.25}),
        Case(
            "qwen2_shared_hidden",
            "qwen2",
            "hidden",
            experts=2,
            shared=1,
            shared_prompts=True,
            architecture="qwen",
            output_type="qwen2_moe",
        ),
        Case(  # Qwen2-MoE from a Llama: zero attention biases
            "llama_qwen_shared",
            "llama",
            "cheap_embed",
            experts=2,
            shared=1,
            shared_prompts=True,
            architecture="qwen",
            output_type="qwen2_moe",
        ),
        Case(
            "qwen3_cheap_embed",
            "qwen3",
            "cheap_embed",
            experts=2,
            architecture="qwen3",
            output_type="qwen3_moe",
        ),
        Case(
            "llama_deepseek_shared",
            "llama",
            "cheap_embed",
            experts=2,
            shared=1,
            output_type="deepseek",
        ),
    )
}
