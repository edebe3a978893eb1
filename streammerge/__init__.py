"""streammerge: merge Hugging Face checkpoints one tensor at a time, in bounded memory."""

__version__ = "0.1.0"

from streammerge.api import merge, schedule  # noqa: E402
from streammerge.errors import StreamMergeError  # noqa: E402
from streammerge.evaluation.compare import Comparison, compare  # noqa: E402
from streammerge.evaluation.evaluate import EvalResult, evaluate  # noqa: E402
from streammerge.frontdoors.model_merger import MergeConfig, ModelMerger  # noqa: E402
from streammerge.plan import MergePlan, load_plan  # noqa: E402

__all__ = ["Comparison", "EvalResult", "MergeConfig", "MergePlan", "ModelMerger", "StreamMergeError",
           "__version__", "compare", "evaluate", "load_plan", "merge", "schedule"]
