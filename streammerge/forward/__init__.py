"""The layer stream: run a checkpoint's own transformers modules one decoder layer at a time.

``LayerStream`` holds one layer's weights in memory at a time, read by streammerge's reader, and
carries a batch's hidden states from layer to layer (spilled to a temp file past a budget);
``VocabHead`` runs the final norm and the output head in vocabulary and token chunks. Evaluation,
greedy generation and calibration are clients of these two; none of them loads a whole model.
"""

from streammerge.forward.head import VocabHead
from streammerge.forward.stream import Batch, LayerStream

__all__ = ["Batch", "LayerStream", "VocabHead"]
