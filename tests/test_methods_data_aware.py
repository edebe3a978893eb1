"""The data-aware methods end to end against float64 references written here: TIES/breadcrumbs/DELLA
ranking by Wanda or SparseGPT importance, RegMean and Fisher merging, reading statistics
directories written with ``StatsWriter`` (Grams XᵀX/n of random inputs with columns of very
different scales, positive Fisher values); plus the plan keys and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import references as ref
import streammerge
from checkpoint_builder import Arch, Family, write_family
from conftest import load_output, merge_with_chunk_sizes
from streammerge.calibration.statsdir import Provenance, StatsDir, StatsWriter
from streammerge.errors import PlanError
from streammerge.methods import TensorParams, importance
from streammerge.methods.random import Stream
from streammerge.schedule import describe
from streammerge.statistics import JobStatistics, ModelStatistics

ARCH = Arch(hidden=32, intermediate=48, layers=2, vocab=64)
TOKENS = 96
INPUTS = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
          "self_attn.o_proj": "o", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down"}


def linear_name(name: str) -> bool:
    return any(f".{m}.weight" in name for m in INPUTS) and ".layers." in name


def write_stats(path: Path, family: Family, model: Path, seed: int,
                kinds: tuple[str, ...] = ("gram", "sqnorm", "fisher"),
                skip: str | None = None, provenance_data: str = "d" * 64,
                tokens: int = TOKENS) -> dict[str, dict[str, torch.Tensor]]:
    """A statistics directory for ``model``: per layer, one random input X per input group (q/k/v
    and gate/up share theirs, as calibration stores them), columns scaled by e^N(0,1); Fisher
    values (g²)/S > 0 for every tensor. ``skip``: a weight left without statistics; ``tokens``: rows
    of X (fewer than a weight's inputs: a singular Gram). Returns the statistics by weight, as
    stored (float32)."""
    g = torch.Generator().manual_seed(seed)
    provenance = Provenance(str(model), "m" * 64, "synthetic", provenance_data, {"seqlen": 8}, tokens, 12)
    writer = StatsWriter(path, provenance, list(kinds))
    tensors = family.tensors[model]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for layer in range(ARCH.layers):
        layer_stats: dict[str, dict[str, torch.Tensor]] = {}
        xs: dict[str, torch.Tensor] = {}
        first: dict[str, str] = {}  # group -> the weight that stores its input statistics
        for module, group in INPUTS.items():
            name = f"model.layers.{layer}.{module}.weight"
            cols = tensors[name].shape[1]
            if group not in xs:
                scale = torch.randn(cols, generator=g).exp()
                xs[group] = torch.randn(tokens, cols, generator=g, dtype=torch.float64) * scale
                first[group] = name
            x = xs[group]
            layer_stats[name] = {k: v for k, v in (("gram", x.T @ x / tokens), ("sqnorm", x.square().sum(0)))
                                 if k in kinds}
        names = {f"model.layers.{layer}.{m}.weight": grp for m, grp in INPUTS.items()}
        shared = {n: first[grp] for n, grp in names.items() if n != first[grp]}
        for name, t in tensors.items():
            if f"layers.{layer}." in name and "fisher" in kinds:
                layer_stats.setdefault(name, {})["fisher"] = torch.randn(t.shape, generator=g).square() * 1e-3
        layer_stats.pop(skip, None)
        stored = {n: {k: v for k, v in d.items() if n not in shared or k == "fisher"}
                  for n, d in layer_stats.items()}
        writer.write_layer(layer, stored, shared={n: o for n, o in shared.items() if n != skip and o != skip})
        out |= {k: {kind: v.float() for kind, v in d.items()} for k, d in layer_stats.items()}
    if "fisher" in kinds:
        rest = {n: {"fisher": torch.rand(t.shape, generator=g) * 1e-3}
                for n, t in tensors.items() if ".layers." not in n}
        writer.write_layer(ARCH.layers, rest)
        out |= rest
    writer.finish()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, list[Path], list[dict]]:
    root = tmp_path_factory.mktemp("data_aware")
    family = write_family(root, ARCH, n=3)
    dirs = [root / f"stats{i}" for i in range(3)]
    stats = [write_stats(d, family, m, seed=10 + i) for i, (d, m) in enumerate(zip(dirs, family.models))]
    return family, dirs, stats


def plan(family: Family, dirs: list[Path], method: str, per_model: dict[str, list[float]], base: bool = True,
         **parameters: object) -> dict:
    models = [{"model": str(m), "calibration": {"stats": str(d)},
               "parameters": {k: v[i] for k, v in per_model.items()}}
              for i, (m, d) in enumerate(zip(family.models, dirs))]
    out: dict = {"merge_method": method, "models": models, "parameters": dict(parameters), "dtype": "float32"}
    if base:
        out["base_model"] = str(family.base)
    return out


# --- references ----------------------------------------------------------------------------------

def scores(delta32: torch.Tensor, st: dict[str, torch.Tensor] | None, importance: str,
           damp: float = 0.01) -> torch.Tensor:
    """Float32 importance of a float32 task vector: |δ|·sqrt(Σx²), or δ²/[(G + λI)⁻¹]_jj with the
    inverse in float64."""
    if st is None or importance == "magnitude":
        return delta32.abs()
    if importance == "wanda":
        return delta32.abs() * st["sqnorm"].sqrt()
    gram = st["gram"].double()
    damped = gram + damp * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    return delta32.square() / torch.linalg.inv(damped).diagonal().float()


def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest scores; equal scores by lowest flat index."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.sort(-score.reshape(-1), stable=True).indices[:k]] = True
    return mask.reshape(score.shape)


def ties_reference(family: Family, stats: list[dict], name: str, ws: list[float], ds: list[float],
                   importance: str) -> torch.Tensor:
    base = family.tensors[family.base][name]
    sparsified = []
    for m, st, d in zip(family.models, stats, ds):
        delta32 = family.tensors[m][name].float() - base.float()
        keep = top_k(scores(delta32, st.get(name) if linear_name(name) else None, importance),
                     max(1, int(d * base.numel())))
        sparsified.append(base.double() + (family.tensors[m][name].double() - base.double()) * keep)
    return ref.task_family(base, sparsified, ws, consensus=True, normalize=True)


def shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * gram + (1 - alpha) * torch.diag(gram.diagonal())


# --- importance ----------------------------------------------------------------------------------

def band(score: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the int(γ·n) highest scores, keep the next int(density·n)."""
    n = score.numel()
    target = int(density * n)
    n_top = min(int(gamma * n), n - target)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.sort(-score.reshape(-1), stable=True).indices[n_top : n_top + target]] = True
    return mask.reshape(score.shape)


def della(score: torch.Tensor, density: float, eps: float, name: str) -> torch.Tensor:
    """DELLA: keep with p = density − ε + 2ε·r/(m−1), r the ascending rank of the score in its row
    (a 1-D tensor is one row), u from the project's generator (seed 0, model 0)."""
    rows = score.reshape(1, -1) if score.dim() < 2 else score
    rank = rows.argsort(dim=1, stable=True).argsort(dim=1).double() / (rows.shape[1] - 1)
    u = Stream(0, name, 0).uniform(0, score.numel()).reshape(rows.shape)
    return (u < (density - eps) + rank * 2 * eps).reshape(score.shape)


@pytest.mark.parametrize("method,importance", [("ties", "wanda"), ("ties", "sparsegpt"),
                                               ("breadcrumbs", "sparsegpt"), ("della", "wanda")])
def test_keep_masks_match_the_reference(world, tmp_path: Path, method: str, importance: str) -> None:
    """One fine-tune merged into the base: the entries that moved are exactly the kept ones."""
    family, dirs, stats = world
    per_model = ({"weight": [1.0] * 3, "density": [0.3] * 3}
                 | ({"gamma": [0.05] * 3} if method == "breadcrumbs" else {}))
    p = plan(family, dirs, method, per_model, importance=importance)
    p["models"] = p["models"][:1]
    streammerge.merge(p, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    base, ft = family.tensors[family.base], family.tensors[family.models[0]]
    checked = 0
    for name in ARCH.shapes():
        delta32 = ft[name].float() - base[name].float()
        s = scores(delta32, stats[0].get(name) if linear_name(name) else None, importance)
        if method == "ties":
            keep = top_k(s, max(1, int(0.3 * delta32.numel())))
        elif method == "breadcrumbs":
            keep = band(s, 0.3, 0.05)
        else:
            keep = della(s.abs(), 0.3, 0.15, name)
        moved = out[name] != base[name].float()
        assert torch.equal(moved, keep & (delta32 != 0)), name
        checked += linear_name(name)
    assert checked == 7 * ARCH.layers
    if method == "ties":  # the importance changes what is kept: not the magnitude mask on the linear weights
        name = "model.layers.0.mlp.down_proj.weight"
        delta32 = ft[name].float() - base[name].float()
        assert not torch.equal(out[name] != base[name].float(),
                               top_k(delta32.abs(), int(0.3 * delta32.numel())) & (delta32 != 0))


@pytest.mark.parametrize("importance", ["wanda", "sparsegpt"])
def test_ties_with_importance_matches_the_reference(world, tmp_path: Path, importance: str) -> None:
    family, dirs, stats = world
    ws, ds = [0.8, 0.5, 0.6], [0.3, 0.5, 0.2]
    streammerge.merge(plan(family, dirs, "ties", {"weight": ws, "density": ds}, importance=importance),
                      tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    for name in ARCH.shapes():
        expected = ties_reference(family, stats, name, ws, ds, importance)
        assert (out[name].double() - expected).abs().max() <= 1e-6, name


@pytest.mark.parametrize("method,importance", [("ties", "wanda"), ("breadcrumbs_ties", "sparsegpt"),
                                               ("della", "wanda"), ("regmean", None), ("fisher", None)])
def test_chunk_sizes_give_the_same_bytes(world, tmp_path: Path, method: str, importance: str | None) -> None:
    family, dirs, _ = world
    per_model = {"weight": [0.8, 0.5, 0.6]}
    params: dict = {}
    if importance is not None:
        per_model["density"] = [0.3, 0.5, 0.4]
        params = {"importance": importance}
    p = plan(family, dirs, method, per_model, base=importance is not None, **params)
    outputs = merge_with_chunk_sizes(p, tmp_path, (32, 5 * 32, 10**9))
    assert outputs[0] == outputs[1] == outputs[2]


def test_magnitude_importance_is_todays_ties(world, tmp_path: Path) -> None:
    family, dirs, _ = world
    today = plan(family, dirs, "ties", {"weight": [0.8, 0.5, 0.6], "density": [0.3, 0.5, 0.2]})
    for m in today["models"]:
        del m["calibration"]
    streammerge.merge(today, tmp_path / "today", quiet=True)
    streammerge.merge(plan(family, dirs, "ties", {"weight": [0.8, 0.5, 0.6], "density": [0.3, 0.5, 0.2]},
                           importance="magnitude"),
                      tmp_path / "magnitude", quiet=True)
    assert ((tmp_path / "today/model.safetensors").read_bytes()
            == (tmp_path / "magnitude/model.safetensors").read_bytes())


# --- regmean and fisher --------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.9, 0.4])
def test_regmean_matches_the_reference(world, tmp_path: Path, alpha: float) -> None:
    family, dirs, stats = world
    ws = [1.0, 0.5, 2.0]
    streammerge.merge(plan(family, dirs, "regmean", {"weight": ws}, base=False, alpha=alpha),
                      tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    for name in ARCH.shapes():
        xs = [family.tensors[m][name].double() for m in family.models]
        if linear_name(name):
            grams = [w * shrunk(st[name]["gram"].double(), alpha) for w, st in zip(ws, stats)]
            expected = torch.linalg.solve(sum(grams), sum(g @ x.T for g, x in zip(grams, xs))).T
        else:
            expected = sum(w * x for w, x in zip(ws, xs)) / sum(ws)
        assert (out[name].double() - expected).abs().max() <= 1e-6, name


def test_regmean_falls_back_to_the_pseudo_inverse(world, tmp_path: Path) -> None:
    """Grams of 8 tokens, α = 1: A = Σ w_i G_i has rank 24 for down_proj's 48 inputs. The result
    still solves the normal equations W* A = Σ w_i W_i G_i, and each such tensor is named."""
    family, _, _ = world
    dirs = [tmp_path / f"s{i}" for i in range(3)]
    stats = [write_stats(d, family, m, 30 + i, kinds=("gram",), tokens=8)
             for i, (d, m) in enumerate(zip(dirs, family.models))]
    result = streammerge.merge(plan(family, dirs, "regmean", {"weight": [1.0] * 3}, base=False, alpha=1.0),
                               tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    name = "model.layers.1.mlp.down_proj.weight"
    assert (f"tensor {name!r}: regmean's Σ w_i G̃_i is ill-conditioned: solved with its pseudo-inverse"
            in result.notes)
    grams = [st[name]["gram"].double() for st in stats]
    target = sum(family.tensors[m][name].double() @ g for m, g in zip(family.models, grams))
    assert torch.linalg.matrix_rank(sum(grams), rtol=1e-5) == 24  # float32-stored: rank up to rounding
    assert ((out[name].double() @ sum(grams) - target).abs().max()
            <= 1e-5 * target.abs().max())  # the average: 0.13


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_matches_the_reference(world, tmp_path: Path, normalize: bool) -> None:
    family, dirs, stats = world
    ws, floor = [1.0, 0.5, 2.0], 1e-5
    p = plan(family, dirs, "fisher", {"weight": ws}, base=False, fisher_floor=floor,
             normalize_fisher=normalize)
    streammerge.merge(p, tmp_path / "out", quiet=True)
    out = load_output(tmp_path / "out")
    norms = [sum(s["fisher"].double().square().sum() for s in st.values()).sqrt() if normalize else 1.0
             for st in stats]
    for name in ARCH.shapes():
        coef = [w * (st[name]["fisher"].double() / n + floor) for w, st, n in zip(ws, stats, norms)]
        expected = sum(c * family.tensors[m][name].double() for c, m in zip(coef, family.models)) / sum(coef)
        assert (out[name].double() - expected).abs().max() <= 1e-6, name


# --- plan keys and refusals ----------------------------------------------------------------------

def test_a_models_own_calibration_wins(world, tmp_path: Path) -> None:
    """The plan-wide calibration names a directory without sqnorm; each model's own is used."""
    family, dirs, _ = world
    write_stats(tmp_path / "grams", family, family.models[0], 0, kinds=("gram",))
    p = plan(family, dirs, "ties", {"weight": [1.0] * 3, "density": [0.3] * 3}, importance="wanda")
    streammerge.merge(p, tmp_path / "own", quiet=True)
    streammerge.merge({**p, "calibration": {"stats": str(tmp_path / "grams")}}, tmp_path / "both", quiet=True)
    assert ((tmp_path / "own/model.safetensors").read_bytes()
            == (tmp_path / "both/model.safetensors").read_bytes())
    for m in p["models"][1:]:  # models without their own take the plan's: it lacks sqnorm
        del m["calibration"]
    with pytest.raises(PlanError, match=f"model {family.models[1]}: ties reads sqnorm statistics of "
                                        "each model; its statistics directory "
                                        f"{tmp_path / 'grams'} has no sqnorm \\(it has gram\\)"):
        streammerge.merge({**p, "calibration": {"stats": str(tmp_path / "grams")}}, tmp_path / "plan",
                          quiet=True)


def test_missing_statistics_are_refused_before_any_weight_is_read(world, tmp_path: Path) -> None:
    family, dirs, _ = world
    p = plan(family, dirs, "ties", {"weight": [1.0] * 3, "density": [0.3] * 3}, importance="sparsegpt")
    del p["models"][2]["calibration"]
    with pytest.raises(PlanError) as e:
        streammerge.merge(p, tmp_path / "out", quiet=True)
    assert str(e.value) == (f"model {family.models[2]}: ties reads gram statistics of each model, and "
                            "it has no calibration: add calibration: {data: FILE} (or {stats: DIR} from "
                            "streammerge calibrate) to its entry or to the plan")
    assert not (tmp_path / "out").exists()
    name = "model.layers.1.mlp.up_proj.weight"
    write_stats(tmp_path / "partial", family, family.models[2], 3, skip=name)
    p["models"][2]["calibration"] = {"stats": str(tmp_path / "partial")}
    with pytest.raises(PlanError, match=f"model {family.models[2]}: no gram statistics for tensor "
                                        f"'{name}' in {tmp_path / 'partial'} \\(other models have "
                                        "them\\): recompute it with streammerge calibrate --stats gram"):
        streammerge.merge(p, tmp_path / "out", quiet=True)
    p = plan(family, dirs, "fisher", {"weight": [1.0] * 3}, base=False)
    p["models"][1]["calibration"] = {"stats": str(tmp_path / "grams-only")}
    write_stats(tmp_path / "grams-only", family, family.models[1], 4, kinds=("gram", "sqnorm"))
    with pytest.raises(PlanError, match="has no fisher \\(it has gram, sqnorm\\): recompute it with "
                                        "streammerge calibrate --stats fisher,gram,sqnorm, or give "
                                        "calibration: {data: FILE}"):
        streammerge.merge(p, tmp_path / "out", quiet=True)


@pytest.mark.parametrize("change,message", [
    ({"calibration": {"data": "x.txt", "stats": "d"}},
     "plan: key 'calibration': a calibration gives exactly one of 'data'"),
    ({"calibration": {"stats": "d", "samples": 4}},
     "plan: key 'calibration': 'samples' describes the windows cut from 'data'"),
    ({"calibration": {"data": "x.txt", "samples": 0}},
     "plan: key 'calibration.samples': Input should be greater than 0"),
    ({"calibration": {"stats": "no/such/dir"}},
     "plan: calibration.stats: statistics directory 'no/such/dir' not found"),
    ({"calibration": {"data": "x.txt", "windows": 3}}, "plan: unknown key 'calibration.windows'"),
    ({"parameters": {"importance": "fisher"}},
     "plan: parameters.importance: got 'fisher', expected one of magnitude, wanda, sparsegpt"),
    ({"parameters": {"damp": 0}}, "plan: parameters.damp: got 0.0, expected a number with 0.0 < damp"),
])
def test_plan_keys_are_validated_at_load(world, change: dict, message: str) -> None:
    family, dirs, _ = world
    p = {**plan(family, dirs, "ties", {"weight": [1.0] * 3, "density": [0.3] * 3}), **change}
    with pytest.raises(PlanError) as e:
        streammerge.schedule(p)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_an_adapter_output_refuses_importance(world) -> None:
    family, dirs, _ = world
    p = plan(family, dirs, "ties", {"weight": [1.0] * 3, "density": [0.3] * 3}, importance="wanda")
    with pytest.raises(PlanError, match="plan: importance: 'wanda' ranks with calibration statistics, "
                                        "which adapter_output does not read \\(it merges the adapters' "
                                        "factors\\)"):
        streammerge.schedule({**p, "adapter_output": {"combination": "svd", "rank": 4}})


def test_plan_prints_the_statistics(world) -> None:
    family, dirs, _ = world
    sched = streammerge.schedule(plan(family, dirs, "regmean", {"weight": [1.0] * 3}, base=False))
    try:
        notes = [n for n in sched.notes if n.startswith("statistics of ")]
        assert notes == [f"statistics of {m}: {d} (gram)" for m, d in zip(family.models, dirs)]
        down = next(j for j in sched.jobs if j.name == "model.layers.0.mlp.down_proj.weight")
        assert down.statistics == ("gram",)
        assert next(j for j in sched.jobs if j.name == "model.norm.weight").statistics == ()
        grams = 4 * ARCH.intermediate**2 * 4  # regmean's N + 1 Grams of down_proj's input, float32
        assert sched.peak_working_bytes >= grams
        assert (f"statistics    {7 * ARCH.layers} tensors read gram; the most prepared at once: "
                f"{grams / 2**20:.1f} MiB "
                "(model.layers.0.mlp.down_proj.weight), counted in the peak") in describe(sched)
    finally:
        sched.close()


def test_changed_statistics_are_not_an_up_to_date_output(world, tmp_path: Path) -> None:
    family, _, _ = world
    dirs = [tmp_path / f"s{i}" for i in range(3)]
    for i, (d, m) in enumerate(zip(dirs, family.models)):
        write_stats(d, family, m, 20 + i, kinds=("fisher",))
    p = plan(family, dirs, "fisher", {"weight": [1.0] * 3}, base=False)
    assert not streammerge.merge(p, tmp_path / "out", quiet=True).up_to_date
    assert streammerge.merge(p, tmp_path / "out", quiet=True).up_to_date
    first = (tmp_path / "out/model.safetensors").read_bytes()
    write_stats(dirs[1], family, family.models[1], 99, kinds=("fisher",),
                provenance_data="e" * 64)  # recalibrated
    assert not streammerge.merge(p, tmp_path / "out", quiet=True, overwrite=True).up_to_date
    assert (tmp_path / "out/model.safetensors").read_bytes() != first


def test_a_shared_gram_is_factored_once(world) -> None:
    """q, k and v share their input's stored Gram: sparsegpt's inverse diagonal is computed for the
    first and handed to the others (the same tensor), and equals the float64 reference."""
    family, dirs, stats = world
    st = ModelStatistics(str(family.models[0]), StatsDir(dirs[0]))
    params = TensorParams({"importance": "sparsegpt", "damp": 0.01}, ({},))
    try:
        got = []
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.1.self_attn.{m}.weight"
            job = JobStatistics(name, (32, 32), ((st, name),), lambda text: None)
            got.append(importance.STATISTICS.prepare(params, job)[0]["inverse_diagonal"])
    finally:
        st.close()
    assert got[0] is got[1] is got[2] and got[3] is not got[0]
    gram = stats[0]["model.layers.1.self_attn.q_proj.weight"]["gram"].double()
    expected = torch.linalg.inv(gram + 0.01 * gram.diagonal().mean()
                                * torch.eye(32, dtype=torch.float64)).diagonal()
    assert ((got[0].double() - expected).abs() / expected).max() <= 1e-5
