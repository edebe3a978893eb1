"""Plans: a YAML file (mergekit's schema or the native extension of it) parsed and validated once."""

from streammerge.plan.load import load_plan
from streammerge.plan.schema import MergePlan, ModelEntry

__all__ = ["MergePlan", "ModelEntry", "load_plan"]
