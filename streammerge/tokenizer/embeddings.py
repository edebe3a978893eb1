"""Row maps that re-index every input's embeddings and head to the output vocabulary, as mergekit's
``PermutedEmbeddings`` does before the method runs.

A token an input has keeps the input's own row. A token it lacks gets the fill: the row of the
only input that has it, else the base's row, else the mean of the rows of the inputs that have
it (zero when none has it). ``tokenizer.tokens`` overrides the fill per token (``source``: a
model's row of the token, a ``model_token`` row, or ``zero``), and with ``force`` every input
takes the fill. Rows past the vocabulary (``pad_to_multiple_of``) are each input's mean row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from streammerge.errors import PlanError
from streammerge.io.reader import Checkpoint
from streammerge.io.rows import Fill, RowMap
from streammerge.plan.schema import ModelToken, TokenSpec, ZeroToken
from streammerge.tokenizer.vocab import Vocabulary


def row_maps(vocab: Vocabulary, overrides: dict[str, TokenSpec], inputs: Sequence[tuple[int, str]],
             checkpoints: Sequence[Checkpoint], base: int | None, notes: list[str]) -> list[RowMap]:
    """One ``RowMap`` per input ``(checkpoint, tensor)`` of an embedding or head tensor; ``base``:
    the base's checkpoint index, if the merge has one."""
    rows = [checkpoints[c].tensors[t].shape[0] for c, t in inputs]
    own = torch.tensor([[vocab.inputs[c].get(tok, -1) for tok in vocab.tokens] for c, _ in inputs], dtype=torch.int64)
    own[own >= torch.tensor(rows).unsqueeze(1)] = -1  # a tokenizer id past the tensor's rows
    present = own >= 0
    ids = vocab.ids
    forced = torch.zeros(len(vocab.tokens), dtype=torch.bool)
    for token, spec in overrides.items():
        forced[ids[token]] = spec.force
    fills: dict[int, Fill] = {}
    nowhere = []
    for r in torch.nonzero(~present.all(0) | forced).flatten().tolist():
        token = vocab.tokens[r]
        spec = overrides.get(token)
        if spec is not None and spec.source is not None:
            fills[r] = _override(token, spec, own[:, r], inputs, rows, vocab, checkpoints)
            continue
        have = torch.nonzero(present[:, r]).flatten().tolist()
        at_base = [k for k in have if inputs[k][0] == base]
        if len(have) == 1 or (have and at_base):
            have = have if len(have) == 1 else at_base
        elif not have:
            nowhere.append(token)
        fills[r] = tuple((inputs[k][0], inputs[k][1], int(own[k, r])) for k in have)
    if nowhere:
        notes.append(f"{inputs[0][1]}: {len(nowhere)} tokens are in no input (e.g. {nowhere[0]!r}): zero rows")
    padding = torch.full((vocab.rows - len(vocab.tokens),), -1, dtype=torch.int64)
    return [RowMap(torch.cat([torch.where(present[k] & ~forced, own[k], -1), padding]), fills, len(vocab.tokens))
            for k in range(len(inputs))]


def _override(token: str, spec: TokenSpec, own: torch.Tensor, inputs: Sequence[tuple[int, str]], rows: list[int],
              vocab: Vocabulary, checkpoints: Sequence[Checkpoint]) -> Fill:
    at = f"tokenizer.tokens.{token}.source"
    if isinstance(spec.source, ZeroToken):
        return ()
    model = spec.source.model if isinstance(spec.source, ModelToken) else spec.source
    k = next((k for k, (c, _) in enumerate(inputs) if checkpoints[c].path == Path(model)), None)
    if k is None:
        raise PlanError(f"{at}: {model} is not an input of {inputs[0][1]} (name a model of the merge)")
    if isinstance(spec.source, ModelToken):
        row = spec.source.token_id if spec.source.token_id is not None else vocab.originals[inputs[k][0]].get(spec.source.token)
        if row is None or not 0 <= row < rows[k]:
            wanted = spec.source.token_id if spec.source.token_id is not None else repr(spec.source.token)
            raise PlanError(f"{at}: {model} has no token {wanted} within its {rows[k]} embedding rows")
    else:
        row = int(own[k])
        if row < 0:
            raise PlanError(f"{at}: {model} has no token {token!r}; name a model that has it, or a model_token source")
    return ((inputs[k][0], inputs[k][1], row),)
