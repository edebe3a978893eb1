"""Mixtures of experts built from dense fine-tunes of one base, as mergekit-moe builds them."""

from streammerge.moe.build import build_moe
from streammerge.moe.config import MoEConfig, load_config

__all__ = ["MoEConfig", "build_moe", "load_config"]
