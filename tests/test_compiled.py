"""The compiled kernels (``compiled``) against the torch path, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.methods import compiled, get_method, slerp
from streammerge.methods.base import Chunk, TensorParams, run_passes
from streammerge.methods.random import Stream
from streammerge.methods.slerp import collect_dots
from streammerge.methods.task_arithmetic import _rank_norm

pytestmark = pytest.mark.skipif(
    compiled.unavailable() is not None,
    reason=f"compiled kernels unavailable: {compiled.unavailable()}",
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
METHODS = ["ties", "dare_ties", "dare_linear", "task_arithmetic", "della", "della_linear"]
# magnitudes from subnormal to near float16's largest, zeros of both signs
SPECIAL = [0.0, -0.0, 1e-7, -3e-8, 6e-5, 1.0, -2.5, 65000.0, -60000.0, 1e-3]


def _merge(
    method: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    per_model: list[dict],
    glob: dict,
    rows_per_chunk: int,
    kernels: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> torch.Tensor:
    """The method over row chunks, as the engine runs it, with the compiled kernels or without."""
    with monkeypatch.context() as m:
        if not kernels:
            m.setattr(compiled, "supports", lambda x: False)
        spec = get_method(method)
        defaults = {p.name: p.default for p in spec.params if not p.per_model}
        per = tuple({**{p.name: p.default for p in spec.params if p.per_model}, **pm} for pm in per_model)
        params = TensorParams({**defaults, **glob}, per)
        rows = base.shape[0]

        def chunks() -> list[Chunk]:
            return [
                Chunk(
                    "w",
                    tuple(base.shape),
                    base[s : s + rows_per_chunk],
                    [x[s : s + rows_per_chunk] for x in models],
                    params,
                    s,
                    min(s + rows_per_chunk, rows),
                    11,
                    tuple(range(len(models))),
                )
                for s in range(0, rows, rows_per_chunk)
            ]

        stats = run_passes(spec.passes_for(params), chunks)
        return torch.cat([spec.merge(c, stats) for c in chunks()])


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.element_size() == 4 else torch.int16)


values = st.sampled_from(SPECIAL) | st.floats(-4, 4, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(METHODS),
    st.sampled_from(DTYPES),
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 40),
    st.data(),
)
def test_kernels_merge_the_same_bits_as_the_torch_path(
    method: str, dtype: torch.dtype, n: int, rows: int, cols: int, data: st.DataObject
) -> None:
    monkeypatch = pytest.MonkeyPatch()
    numel = rows * cols
    base = torch.tensor(data.draw(st.lists(values, min_size=numel, max_size=numel)), dtype=torch.float32)
    models = []
    for _ in range(n):
        noise = torch.tensor(
            data.draw(st.lists(values, min_size=numel, max_size=numel)), dtype=torch.float32
        )
        scale = data.draw(st.sampled_from([1.0, 1e-2, 1e-4]))
        models.append((base + noise * scale).to(dtype).reshape(rows, cols))
    base = base.to(dtype).reshape(rows, cols)
    weight = st.sampled_from([1.0, 0.5, -0.3, 0.0, 1.7, 1 / 3]) | st.floats(-2, 2, allow_nan=False)
    per_model = [{"weight": data.draw(weight)} for _ in range(n)]
    glob = {"lambda": data.draw(st.sampled_from([1.0, 0.7, 2.0]))}
    if method != "task_arithmetic":
        densities = (
            [1.0, 0.5, 0.3] if method.startswith("della") else [1.0, 0.5, 0.2, 0.9]
        )  # della: density ± 0.15 in (0, 1)
        for p in per_model:
            p["density"] = data.draw(st.sampled_from(densities))
    if method not in ("dare_linear", "della_linear"):
        glob["normalize"] = data.draw(st.booleans())
    if method.startswith(("dare", "della")):
        glob["rescale"] = data.draw(st.booleans())
    rows_per_chunk = data.draw(st.integers(1, rows))
    want = _merge(method, base, models, per_model, glob, rows_per_chunk, False, monkeypatch)
    got = _merge(method, base, models, per_model, glob, rows_per_chunk, True, monkeypatch)
    assert torch.equal(_bits(got), _bits(want))


def test_every_finite_half_and_bfloat16_round_trips_through_the_kernel() -> None:
    """B = 0, one model of weight 1: out = x for every finite value of the 16-bit types."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        x = x[torch.isfinite(x)]
        out = compiled.merge(
            torch.zeros_like(x), [x], [compiled.Keep()], [1.0], [1.0], False, False, 0.0, 1.0
        )
        want = x + 0  # -0 - 0 is +0 in torch too
        assert torch.equal(_bits(out), _bits(want))


def test_all_finite_tells_every_16_bit_pattern_and_float32_exponent_as_isfinite() -> None:
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    g = torch.Generator().manual_seed(3)
    wide = torch.randint(-(1 << 31), 1 << 31, (4096,), generator=g, dtype=torch.int64).to(torch.int32)
    wide[::7] |= 0x7F800000  # all-ones exponents: infinities and NaNs of both signs
    for x in (patterns.view(torch.bfloat16), patterns.view(torch.float16), wide.view(torch.float32)):
        got = [compiled.all_finite(x[k : k + 1]) for k in range(x.numel())]
        assert got == torch.isfinite(x).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("at", [0, 2047, 2048, 9999])
def test_all_finite_finds_one_bad_value_in_any_block(dtype: torch.dtype, at: int) -> None:
    x = torch.randn(10_000).to(dtype)
    assert compiled.all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[at] = bad
        assert not compiled.all_finite(y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_delta_is_torchs_sub_then_abs_and_refuses_what_is_not_finite(dtype: torch.dtype) -> None:
    """|x − B| for random bit patterns of both (subnormals, ±0, overflow to infinity, NaN)."""
    g = torch.Generator().manual_seed(5)
    wide = dtype == torch.float32
    lo, hi = (-(1 << 31), 1 << 31) if wide else (-(1 << 15), 1 << 15)
    bits = torch.randint(lo, hi, (2, 50_000), generator=g, dtype=torch.int64)
    x, base = bits.to(torch.int32 if wide else torch.int16).view(dtype)
    finite = torch.isfinite(x) & torch.isfinite(base) & torch.isfinite(x - base)
    x, base = x[finite], base[finite]
    assert torch.equal(_bits(compiled.abs_delta(base, x)), _bits((x - base).abs()))
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[4097] = bad
        assert compiled.abs_delta(base, y) is None
    big = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
    assert compiled.abs_delta(-big, big) is None  # finite inputs whose difference overflows


@pytest.mark.parametrize("dtype", DTYPES)
def test_products_round_like_torch_across_the_whole_range(dtype: torch.dtype) -> None:
    """x·w for random 16-bit patterns (subnormals and overflow included) and awkward weights."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(1 << 15), 1 << 15, (1 << 16,), generator=g, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16).float() if dtype != torch.bfloat16 else bits.view(torch.bfloat16).float()
    x = x[torch.isfinite(x)].to(dtype)
    for w in (0.1, 3.0, -1 / 3, 1e-3, 7.5e3):
        wr = torch.tensor(w, dtype=dtype).item()
        out = compiled.merge(
            torch.zeros_like(x), [x], [compiled.Keep()], [1.0], [wr], False, False, 0.0, 1.0
        )
        want = (x * wr) + 0
        finite = torch.isfinite(want)
        if out is None:  # an overflow to infinity is handed back to the torch path
            assert not bool(finite.all())
            continue
        assert torch.equal(_bits(out), _bits(want))


def test_a_chunk_with_infinity_is_handed_back_and_merged_by_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.zeros(4, 8, dtype=torch.bfloat16)
    x = torch.full((4, 8), 0.5, dtype=torch.bfloat16)
    x[1, 3] = float("inf")
    assert (
        compiled.merge(
            base.reshape(-1), [x.reshape(-1)], [compiled.Keep()], [1.0], [1.0], True, True, 0.0, 1.0
        )
        is None
    )
    per_model, glob = [{"weight": 1.0, "density": 1.0}], {}
    want = _merge("ties", base, [x], per_model, glob, 4, False, monkeypatch)
    got = _merge("ties", base, [x], per_model, glob, 2, True, monkeypatch)
    assert torch.equal(_bits(got), _bits(want))


def test_without_a_compiler_the_reason_is_named_and_torch_merges(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiled._library.cache_clear()
    try:
        assert compiled.unavailable() == "no C compiler (no-such-cc) on PATH"
        assert not compiled.supports(torch.zeros(2))
        base = torch.zeros(2, 3, dtype=torch.bfloat16)
        out = _merge("task_arithmetic", base, [base + 1], [{"weight": 0.5}], {}, 1, True, monkeypatch)
        assert torch.equal(out, torch.full((2, 3), 0.5, dtype=torch.bfloat16))
        assert not any(tmp_path.iterdir())
    finally:
        compiled._library.cache_clear()


def test_the_library_is_compiled_once_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiled._library.cache_clear()
    try:
        assert compiled.unavailable() is None
        built = list((tmp_path / "streammerge").iterdir())
        assert len(built) == 1 and built[0].name.startswith("compiled-") and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        compiled._library.cache_clear()
        assert compiled.unavailable() is None
        assert [p.stat().st_mtime_ns for p in (tmp_path / "streammerge").iterdir()] == [stamp]
    finally:
        compiled._library.cache_clear()


@pytest.mark.parametrize("method", METHODS)
def test_ordinary_chunks_are_merged_by_the_kernels(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On finite inputs every chunk's merge (and TIES's first pass) runs compiled, not on torch."""
    calls = {"merge": 0, "histograms": 0}
    for name in calls:
        real = getattr(compiled, {"merge": "merge", "histograms": "delta_histograms"}[name])

        def spy(*args, _real=real, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = _real(*args, **kwargs)
            calls[_name] += out is not None
            return out

        monkeypatch.setattr(compiled, {"merge": "merge", "histograms": "delta_histograms"}[name], spy)
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(8, 64, generator=g) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(8, 64, generator=g) * 2e-3).bfloat16() for _ in range(2)]
    per_model = [
        {"weight": 0.5} | ({} if method == "task_arithmetic" else {"density": 0.4}) for _ in models
    ]
    _merge(method, base, models, per_model, {}, 2, True, monkeypatch)
    assert calls["merge"] == 4
    assert calls["histograms"] == (4 if method == "ties" else 0)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.001, 0.999), st.integers(0, 2**33), st.integers(1, 5000), st.integers(0, 2**31))
def test_compiled_draws_are_the_torch_draws(p: float, start: int, count: int, seed: int) -> None:
    """``below`` and ``below_each`` (float and per-element probabilities), across a 2³² key block too."""
    stream = Stream(seed, "model.layers.0.mlp.up_proj.weight", 3)
    fast = stream.below(p, start, count)
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(count, generator=g, dtype=torch.float64)
    probs[::3] = (
        torch.randint(0, 1 << 24, (len(probs[::3]),), generator=g).double() / 2**24
    )  # equal to some u
    fast_each = stream.below_each(probs, start)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(compiled, "unavailable", lambda: "off")
        assert torch.equal(fast, stream.below(p, start, count))
        assert torch.equal(fast_each, stream.uniform(start, count) < probs)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(2, 300),
    st.sampled_from([(0.35, 0.15), (0.4, 0.1), (0.05, 0.3)]),
    st.booleans(),
    st.data(),
)
def test_della_keep_ranks_as_a_stable_double_argsort_and_draws_as_the_stream(
    rows: int, cols: int, low_eps: tuple[float, float], crosses: bool, data: st.DataObject
) -> None:
    """Ties, zeros (a bucket of their own), infinities, NaN (refused), wide and narrow rows, and a
    chunk that crosses a 2³² key block (two runs of draws)."""
    special = st.sampled_from([float("inf"), float("nan")])
    flat = data.draw(st.lists(values | special, min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(flat, dtype=torch.float32).to(torch.bfloat16).reshape(rows, cols)
    low, eps = low_eps
    start = 2**32 - data.draw(st.integers(1, x.numel() - 1)) if crosses else data.draw(st.integers(0, 2**33))
    stream = Stream(7, "model.layers.0.mlp.up_proj.weight", 1)
    got = compiled.della_keep(x, low, eps, stream.runs(start, x.numel()))
    if x.isnan().any():  # torch ranks NaN payloads as equal: it ranks them itself
        assert got is None
        return
    p = low + _rank_norm(x, 1) * 2 * eps
    assert torch.equal(got.reshape(-1), stream.uniform(start, x.numel()) < p.reshape(-1))


def test_a_run_without_a_compiler_says_so_in_its_summary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from checkpoint_builder import Arch, write_family
    from click.testing import CliRunner

    from streammerge.cli import main

    family = write_family(tmp_path, Arch(hidden=16, intermediate=32, layers=1, vocab=32), n=2)
    plan = tmp_path / "plan.yaml"
    models = [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in family.models]
    plan.write_text(f"merge_method: ties\nbase_model: {family.base}\nmodels: {models}\ndtype: bfloat16\n")
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    compiled._library.cache_clear()
    try:
        result = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "out")])
    finally:
        compiled._library.cache_clear()
    assert result.exit_code == 0, result.output
    assert "device: cpu" in result.output
    off = "(compiled kernels off: no C compiler (no-such-cc) on PATH; torch ops merge instead"
    assert off in result.output


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(DTYPES), st.integers(1, 4), st.integers(1, 300), st.booleans(), st.data())
def test_linear_kernel_merges_the_same_bits_as_the_torch_path(
    dtype: torch.dtype, n: int, numel: int, normalize: bool, data: st.DataObject
) -> None:
    """From inputs as loaded (bfloat16, float16, float32) to float32, as the engine hands them over;
    lengths of 1-300 cover the vector loops and their tails, signed zeros and huge values included."""
    if compiled._addcmul_fused() is None:
        pytest.skip("this torch's addcmul_ rounds neither fused nor unfused throughout")
    wide = values | st.sampled_from([3e38, -3e38, 1e30])
    elements = st.lists(wide, min_size=numel, max_size=numel)
    models = [torch.tensor(data.draw(elements)).to(dtype) for _ in range(n)]
    weight = st.sampled_from([1.0, 0.5, -0.3, 0.0, 1 / 3]) | st.floats(-2, 2, allow_nan=False)
    weights = [data.draw(weight) for _ in range(n)]
    params = TensorParams({"normalize": normalize}, tuple({"weight": w} for w in weights))
    chunk = Chunk("w", (numel,), None, models, params, 0, numel, 0, tuple(range(n)),
                  compute_dtype=torch.float32)
    linear = get_method("linear")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(compiled, "supports", lambda x: False)
        want = linear.merge(chunk, {})
    got = compiled.linear(models, weights, normalize)
    assert (got is None) == (not bool(torch.isfinite(want).all()))  # not finite: the torch path's NaN bits
    assert torch.equal(_bits(linear.merge(chunk, {})), _bits(want))
    if got is not None:
        assert got.dtype == torch.float32 and torch.equal(_bits(got), _bits(want))


def test_a_chunk_widens_its_inputs_once_and_only_when_read() -> None:
    x = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    chunk = Chunk("w", (2,), x, [x], TensorParams({}, ({},)), 0, 2, 0, (0,), compute_dtype=torch.float32)
    assert "models" not in vars(chunk) and "base" not in vars(chunk)
    assert chunk.models[0].dtype == torch.float32 and chunk.models[0] is chunk.models[0]
    assert chunk.base.dtype == torch.float32 and torch.equal(chunk.base, x.float())
    assert chunk.loaded_models[0] is x


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DTYPES), st.integers(1, 5), st.integers(1, 300), st.floats(0, 1), st.data())
def test_slerp_kernel_merges_the_same_bits_as_the_torch_path(
    dtype: torch.dtype, rows: int, cols: int, t: float, data: st.DataObject
) -> None:
    """Both passes over row chunks from inputs as loaded, bit for bit: the dot pass's float64 row
    sums (magnitudes from 1e-30 to 1e4 in a row, where the order of a sum shows) and the merge."""
    monkeypatch = pytest.MonkeyPatch()
    numel = rows * cols
    wide = st.sampled_from([1e-30, 1e-12, 1e-5, 1.0, 1e4]) if dtype != torch.float16 else st.just(1.0)
    v0, v1 = ((torch.tensor(data.draw(st.lists(values, min_size=numel, max_size=numel)))
               * torch.tensor(data.draw(st.lists(wide, min_size=numel, max_size=numel))))
              .to(dtype).reshape(rows, cols) for _ in range(2))
    spec = get_method("slerp")
    params = TensorParams({"t": t}, ({},))
    step = data.draw(st.integers(1, rows))
    products_bytes = data.draw(st.sampled_from([1, 24 * cols * 2, 1 << 20]))
    merged, dots = [], []
    for kernels in (False, True):
        with monkeypatch.context() as m:
            if not kernels:
                m.setattr(compiled, "supports", lambda x: False)
            m.setattr(slerp, "_PRODUCTS_BYTES", products_bytes)  # the products of one row at a time, or all

            def chunks() -> list[Chunk]:
                return [Chunk("w", (rows, cols), v0[s : s + step], [v1[s : s + step]], params, s,
                              min(s + step, rows), 0, (0,), compute_dtype=torch.float32)
                        for s in range(0, rows, step)]

            dots.append([collect_dots(c, {}) for c in chunks()])
            stats = run_passes(spec.passes_for(params), chunks)
            merged.append(torch.cat([spec.merge(c, stats) for c in chunks()]))
    for torch_dots, compiled_dots in zip(*dots):
        assert all(torch.equal(torch_dots[k].view(torch.int64), compiled_dots[k].view(torch.int64))
                   for k in ("dot", "n0", "n1"))
    assert merged[0].dtype == merged[1].dtype == torch.float32
    assert torch.equal(_bits(merged[1]), _bits(merged[0]))
