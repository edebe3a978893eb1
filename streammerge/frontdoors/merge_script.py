"""The command line of the LLaMA merge script that prints TIES-magnitude, DARE-random and
TIES-SparseGPT side by side (``--base_model B --finetuned_models M1 M2 --datasets D1 D2
--density 0.2``), translated into native plans for ``compare``.

The script merges each way with weight 1 per model and ``density`` kept: TIES trims by magnitude,
elects signs and averages the agreeing entries (``ties``, its defaults); DARE drops entries at
random, rescales the survivors and sums the task vectors, with no sign election and no division by
the weights (``dare_linear``: ``normalize: false`` and ``rescale: true``, its defaults; the script
divides by ``density``, which keeps the L1 norm in expectation, where ``rescale`` keeps it exactly);
TIES-SparseGPT ranks by SparseGPT's saliency from model i's inputs on dataset i (``ties`` with
``importance: sparsegpt``). Model i's statistics are measured once into the calibration cache and
named in the plan by directory, so nothing downstream knows this syntax.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streammerge.calibration.calibrate import cached_stats
from streammerge.errors import PlanError
from streammerge.evaluation.compare import Comparison, compare
from streammerge.evaluation.data import read_documents
from streammerge.evaluation.evaluate import evaluate
from streammerge.methods import get_method

RESULTS_NAME = "comparison_results.json"  # the script's file name
STATS_SUBDIR = "statistics"  # under --cache-dir, beside the models fetched there
# (directory, merge method, its parameters) of the script's three merges, in its order
SCRIPT_MERGES = (("ties_magnitude", "ties", {}),
                 ("dare_random", "dare_linear", {"normalize": False, "rescale": True}),
                 ("ties_sparsegpt", "ties", {"importance": "sparsegpt"}))


@dataclass
class ScriptRow:
    method: str  # the output directory's name: one of SCRIPT_MERGES' or of --methods
    merge_method: str
    dataset: str
    perplexity: float
    avg_loss: float  # mean loss per scored token, in nats (the script's name)
    num_tokens: int
    merge_time: float | None  # the merge's seconds (the same on each of its datasets' rows)
    eval_time: float
    output: str


def check_script_request(base: str | None, models: list[str], datasets: list[str]) -> None:
    """The script's flags are given together and agree in number (one dataset may serve every model)."""
    if not models:
        raise PlanError("--finetuned-models: no model given; name the fine-tuned models, e.g. "
                        "--base-model B --finetuned-models M1 M2 --datasets D1 D2")
    if base is None:
        raise PlanError(f"--base-model: missing; the {len(models)} fine-tuned models are merged as task "
                        "vectors from it: add --base-model B")
    if not datasets:
        raise PlanError("--datasets: missing; give one calibration and evaluation dataset per fine-tuned "
                        "model (or one for all)")
    if len(datasets) not in (1, len(models)):
        raise PlanError(f"--datasets: {len(datasets)} datasets for {len(models)} fine-tuned models; give "
                        "one per model, in the same order, or one shared by all")


def script_plans(base: str, models: list[str], datasets: list[str], density: float, *,
                 calibration: dict[str, Any], methods: list[str], stats_cache: Path | None,
                 model_cache: str | None, progress: bool = False) -> dict[str, dict[str, Any]]:
    """{directory name: plan document} for the script's three merges and each of ``methods``.
    Model i's Gram matrices on ``datasets[i]`` (or the one dataset) are measured into the
    calibration cache ``stats_cache`` (or the default one) unless there, and reach the plans as
    ``calibration: {stats: DIR}``: the plans a user would write, with the statistics measured."""
    data = datasets if len(datasets) == len(models) else datasets * len(models)
    stats = [cached_stats(m, {"data": d, **calibration}, ["gram"], stats_cache, model_cache_dir=model_cache,
                          progress=progress) for m, d in zip(models, data)]
    merges = [*SCRIPT_MERGES, *((m, m, {}) for m in methods)]
    plans = {}
    for name, method, extra in merges:
        takes = {p.name for p in get_method(method).params}
        params = {**({"density": density} if "density" in takes else {}), **extra}
        entries = [{"model": m, **({"parameters": {"weight": 1.0}} if "weight" in takes else {}),
                    "calibration": {"stats": str(s)}} for m, s in zip(models, stats)]
        plans[name] = {"merge_method": method, "base_model": base, "parameters": params, "models": entries}
    return plans


def run_script(base: str, models: list[str], datasets: list[str], out_dir: str | Path, *,
               density: float = 0.2,
               calibration_samples: int = 128, methods: list[str] | None = None,
               cache_dir: str | None = None, seqlen: int = 2048, samples: int | None = None,
               stride: int | None = None, text_field: str = "text", max_memory: int | None = None,
               dtype: str = "auto", overwrite: bool = False,
               progress: bool = False) -> tuple[Comparison, list[ScriptRow]]:
    """The script's run: the plans of ``script_plans`` merged and evaluated on the first dataset by
    ``compare`` (its comparison.json), every output then evaluated on each further dataset; writes
    ``out_dir/comparison_results.json``, one row per (merge, dataset). Calibration windows are cut
    as evaluation windows are: ``calibration_samples`` windows of ``seqlen`` tokens. ``cache_dir``
    holds models named org/name and, under ``statistics/``, the calibration cache."""
    check_script_request(base, models, datasets)
    if sorted({*(methods or [])} & {name for name, _, _ in SCRIPT_MERGES}):
        raise PlanError("--methods: ties_magnitude, dare_random and ties_sparsegpt are merged anyway; "
                        "name other methods")
    stats_cache = Path(cache_dir).expanduser() / STATS_SUBDIR if cache_dir is not None else None
    calibration = {"samples": calibration_samples, "seqlen": seqlen, "text_field": text_field}
    plans = script_plans(base, models, datasets, density, calibration=calibration, methods=methods or [],
                         stats_cache=stats_cache, model_cache=cache_dir, progress=progress)
    comparison = compare(plans, datasets[0], out_dir, seqlen=seqlen, samples=samples, stride=stride,
                         text_field=text_field, max_memory=max_memory, dtype=dtype, cache_dir=cache_dir,
                         overwrite=overwrite, progress=progress)
    rows = []
    further = {d: read_documents(d, text_field) for d in dict.fromkeys(datasets[1:]) if d != datasets[0]}
    for r in comparison.rows:
        rows.append(ScriptRow(r.name, r.method, datasets[0], r.perplexity, r.nll, r.tokens, r.merge_seconds,
                              r.eval_seconds, r.output))
        for d, documents in further.items():
            result = evaluate(r.output, documents, seqlen=seqlen, samples=samples, stride=stride, dtype=dtype,
                              max_memory=max_memory, cache_dir=cache_dir, progress=progress)
            assert result.perplexity is not None and result.nll is not None  # data given: windows scored
            rows.append(ScriptRow(r.name, r.method, d, result.perplexity, result.nll, result.tokens,
                                  r.merge_seconds, result.seconds, r.output))
    results = {"protocol": comparison.protocol, "datasets": datasets, "density": density,
               "num_calibration_samples": calibration_samples, "rows": [asdict(r) for r in rows]}
    (comparison.directory / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
    return comparison, rows


def script_table(rows: list[ScriptRow]) -> str:
    """The script's table (method, perplexity, average loss, merge time), a row per dataset."""
    head = ("Method", "Dataset", "Perplexity", "Avg Loss", "Time (s)")
    cells = [(r.method, r.dataset, f"{r.perplexity:.2f}", f"{r.avg_loss:.4f}",
              "-" if r.merge_time is None else f"{r.merge_time:.1f}") for r in rows]
    widths = [max(len(c) for c in column) for column in zip(head, *cells)]
    def aligned(line: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(line, widths)))

    return "\n".join(aligned(line).rstrip() for line in (head, *cells))
