"""Several adapters' updates of one module combined into one pair of LoRA factors.

The models' task vectors are the adapters' ΔW_i = left_i @ right_i (zero for an adapter that
does not adapt the module), merged by the plan's method over a zero base, so the result is the
method's merged task vector. Two ways to factor it:

- ``cat``: exact. A weighted sum (``task_arithmetic``: λ Σ w_i ΔW_i) is the product of the
  stacked factors, [c_1 left_1 … c_n left_n] @ [right_1; …; right_n], of rank Σ r_i.
- ``svd``: the best rank-k approximation, ΔW ≈ U_k S_k V_kᵀ, written as left = U_k S_k and
  right = V_kᵀ (PEFT's choice), optionally clamped to the ``clamp`` quantile of their entries as
  PEFT's ``svd_clamp`` does. For a weighted sum it is computed from the stacked factors through
  two thin QR decompositions and the SVD of a small Σ r_i square core, never forming ΔW; for the
  other methods ΔW is formed for this one module, merged, and decomposed.
"""

from __future__ import annotations

import torch

from streammerge.errors import PlanError
from streammerge.methods import Chunk, MergeMethod, TensorParams, run_passes
from streammerge.plan.schema import AdapterOutput

# Methods whose result is base + f(task vectors), f independent of the base: over a zero base they merge ΔW_i.
ADAPTER_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
_SUM = "task_arithmetic"

Factors = tuple[torch.Tensor, torch.Tensor]


def check_combination(method: MergeMethod, output: AdapterOutput) -> None:
    combination = output.combination
    if combination == "cat" and (output.rank is not None or output.clamp is not None):
        raise PlanError("adapter_output: 'rank' and 'clamp' apply to combination: svd ('cat' keeps every input rank)")
    if method.name not in ADAPTER_METHODS:
        raise PlanError(f"adapter_output: merge_method {method.name!r} cannot merge adapters into an adapter "
                        f"(valid: {', '.join(ADAPTER_METHODS)}); drop adapter_output to write a model")
    if combination == "cat" and method.name != _SUM:
        raise PlanError(f"adapter_output.combination: 'cat' is exact only for task_arithmetic, not {method.name}; "
                        "use combination: svd with a rank")


def _sum_coefficients(params: TensorParams) -> list[float]:
    """c_i of task_arithmetic's λ Σ w_i δ_i (divided by Σ w_i when it normalizes)."""
    weights = params.per_model("weight")
    scale = params.globals["lambda"] / (sum(weights) if params.globals["normalize"] and sum(weights) else 1)
    return [scale * w for w in weights]


def cat_factors(params: TensorParams, factors: list[Factors | None]) -> Factors:
    """The exact weighted sum as stacked factors (adapters without the module add nothing)."""
    pairs = [(c * f[0], f[1]) for c, f in zip(_sum_coefficients(params), factors) if f is not None]
    return torch.cat([p[0] for p in pairs], dim=1), torch.cat([p[1] for p in pairs], dim=0)


def merged_delta(method: MergeMethod, name: str, params: TensorParams, factors: list[Factors | None],
                 shape: tuple[int, int], seed: int, model_ids: tuple[int, ...]) -> torch.Tensor:
    """The method's merged task vector of this module, ΔW_i dense, as one chunk (a module at a time)."""
    deltas = [f[0] @ f[1] if f is not None else torch.zeros(shape) for f in factors]
    # wide: a native adapter combination has no mergekit result to follow, so float64 statistics
    chunk = Chunk(name, shape, torch.zeros(shape, dtype=deltas[0].dtype), deltas, params, 0, shape[0], seed,
                  model_ids, wide=True)
    return method.merge(chunk, run_passes(method.passes_for(params), lambda: [chunk]))


def truncated_svd(delta: torch.Tensor | Factors, rank: int, clamp: float | None) -> Factors:
    """Rank-``rank`` factors (U_k S_k, V_kᵀ) of a dense ΔW or of the product of two factors."""
    if isinstance(delta, tuple):
        q_left, r_left = torch.linalg.qr(delta[0].double())
        q_right, r_right = torch.linalg.qr(delta[1].double().T)
        u, s, vh = torch.linalg.svd(r_left @ r_right.T)
        u, vh = q_left @ u, vh @ q_right.T
    else:
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    left, right = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        bound = torch.quantile(torch.cat([left.flatten(), right.flatten()]), clamp)
        left, right = left.clamp(-bound, bound), right.clamp(-bound, bound)
    return left.float(), right.float()


def combine(method: MergeMethod, combination: str, rank: int, clamp: float | None, name: str, params: TensorParams,
            factors: list[Factors | None], shape: tuple[int, int], seed: int, model_ids: tuple[int, ...]) -> Factors:
    """One module's combined factors, padded with zeros to ``rank`` (cat: at most ``rank``)."""
    clamped = any(params.globals.get(k) is not None for k in ("clamp_min", "clamp_max"))
    if combination == "cat":
        left, right = cat_factors(params, factors)
    elif method.name == _SUM and not clamped:  # a clamp needs the dense sum: below
        left, right = truncated_svd(cat_factors(params, factors), rank, clamp)
    else:
        left, right = truncated_svd(merged_delta(method, name, params, factors, shape, seed, model_ids), rank, clamp)
    pad = rank - left.shape[1]
    return torch.nn.functional.pad(left, (0, pad)), torch.nn.functional.pad(right, (0, 0, 0, pad))
