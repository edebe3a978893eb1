"""`streammerge calibrate`, `calibrate` and `cached_stats` against whole-model transformers runs.

The reference loads each tiny checkpoint (tests/arch_builder.py) the usual way, puts forward
pre-hooks on every linear of its decoder and sums XᵀX and Σx² in float64 over the same windows,
cut here from the tokenized text. The statistics directory must hold the same numbers (float32,
1e-5 of the tensor's scale; diagonals and Σx² 1e-5 relative each), under the checkpoint's names.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from arch_builder import build_model, load_reference, sample_text
from streammerge.calibration import calibrate as calibrate_module
from streammerge.calibration import fisher as fisher_module
from streammerge.calibration.calibrate import cached_stats, calibrate, calibration_windows
from streammerge.calibration.statsdir import StatsDir, StatsWriter, model_fingerprint
from streammerge import statistics as statistics_module
from streammerge.cli import main
from streammerge.errors import PlanError
from streammerge.evaluation.evaluate import load_tokenizer
from streammerge.forward import LayerStream
from streammerge.forward import stream as stream_module

SEQLEN, SAMPLES = 32, 6


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("archs")


@pytest.fixture(scope="module")
def text() -> str:
    return sample_text(700)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory, text: str) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(text)
    return path


def _model(root: Path, family: str) -> Path:
    return root / family if (root / family).is_dir() else build_model(root, family)


def _every_window(model: Path, text: str) -> list[torch.Tensor]:
    """The non-overlapping SEQLEN-token windows of the text as the tokenizer gives it, tail dropped."""
    ids = torch.tensor(load_tokenizer(model)("\n\n".join([text]))["input_ids"])
    return [ids[k * SEQLEN:(k + 1) * SEQLEN] for k in range(len(ids) // SEQLEN)]


def _reference(model: Path, windows: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Checkpoint weight name -> (XᵀX / rows, Σ_t x_tj²) in float64, over every decoder linear of the
    whole model run on ``windows`` one at a time."""
    from transformers.pytorch_utils import Conv1D

    reference = load_reference(model)
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    sums: dict[str, list] = {}

    def hook(name: str):
        def pre(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc = sums.setdefault(name, [0.0, 0.0, 0])
            acc[0], acc[1], acc[2] = acc[0] + x.T @ x, acc[1] + x.square().sum(0), acc[2] + x.shape[0]
        return pre

    layers = next(m for m in reference.base_model.children() if isinstance(m, torch.nn.ModuleList))
    for name, module in reference.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and any(module is m for m in layers.modules()):
            assert f"{name}.weight" in stored  # these families' checkpoints use the model's names
            module.register_forward_pre_hook(hook(f"{name}.weight"))
    with torch.no_grad():
        for ids in windows:
            reference(ids[None])
    return {name: (g / rows, s) for name, (g, s, rows) in sums.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_statistics_match_the_whole_model(models: Path, text: str, tmp_path: Path, family: str) -> None:
    model = _model(models, family)
    windows = _every_window(model, text)[:SAMPLES]
    # 64-token batches: three batches per layer, each adding to the same accumulators
    out = calibrate(model, [text], samples=SAMPLES, seqlen=SEQLEN, out=tmp_path / "stats", batch_tokens=64)
    stats = StatsDir(out)
    reference = _reference(model, windows)
    assert sorted(stats.entries) == sorted(reference)  # every decoder linear, nothing else
    for name, (gram, sqnorm) in reference.items():
        got_gram, got_sqnorm = stats.read(name, "gram").double(), stats.read(name, "sqnorm").double()
        assert got_gram.dtype == got_sqnorm.dtype == torch.float64  # read back from float32 files
        assert (got_gram - gram).abs().max() <= 1e-5 * gram.abs().max(), name
        torch.testing.assert_close(got_gram.diagonal(), gram.diagonal(), rtol=1e-5, atol=0)
        torch.testing.assert_close(got_sqnorm, sqnorm, rtol=1e-5, atol=0)
        assert stats.shape(name, "gram") == (len(sqnorm), len(sqnorm))
    if family == "gpt2":  # Conv1D: the weight is [in, out], the statistics index its rows
        name = "transformer.h.0.mlp.c_proj.weight"
        with safe_open(str(model / "model.safetensors"), "pt") as f:
            assert stats.shape(name, "sqnorm") == (f.get_slice(name).get_shape()[0],) == (96,)


def test_linears_sharing_an_input_share_one_statistic(models: Path, text: str, tmp_path: Path) -> None:
    out = calibrate(_model(models, "llama"), [text], samples=2, seqlen=SEQLEN, out=tmp_path / "stats")
    entries = json.loads((out / "manifest.json").read_text())["tensors"]
    for i in range(3):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("gram", "sqnorm"):
            q_file = [f"layer-0000{i}-gram-sqnorm.safetensors", f"{attn}q_proj.weight:{kind}"]
            assert entries[attn + "q_proj.weight"][kind] == entries[attn + "k_proj.weight"][kind] \
                == entries[attn + "v_proj.weight"][kind] == q_file
            assert entries[mlp + "gate_proj.weight"][kind] == entries[mlp + "up_proj.weight"][kind]
            assert entries[attn + "o_proj.weight"][kind][1] == f"{attn}o_proj.weight:{kind}"
        with safe_open(str(out / f"layer-0000{i}-gram-sqnorm.safetensors"), "pt") as f:
            # q/k/v, o, gate/up, down: four inputs, each stored once per kind
            assert sorted(f.keys()) == sorted(f"{attn if w[0] in 'qo' else mlp}{w}.weight:{k}"
                                              for w in ("q_proj", "o_proj", "gate_proj", "down_proj")
                                              for k in ("gram", "sqnorm"))


def test_provenance(models: Path, text: str, tmp_path: Path) -> None:
    model = _model(models, "llama")
    out = calibrate(model, [text], samples=4, seqlen=SEQLEN, kinds=["sqnorm"], out=tmp_path / "stats")
    stats = StatsDir(out)
    p = stats.provenance
    digest = hashlib.sha256()
    for ids in _every_window(model, text)[:4]:
        digest.update(len(ids).to_bytes(8, "little") + ids.numpy().astype("<i8").tobytes())
    raw = (model / "model.safetensors").read_bytes()  # the file's size and its header's sha256
    header = hashlib.sha256(raw[:8 + int.from_bytes(raw[:8], "little")]).hexdigest()
    assert p.model_fingerprint == model_fingerprint({"model.safetensors": (len(raw), header)})
    assert (p.model, p.data, p.data_fingerprint) == (str(model), "1 documents", digest.hexdigest())
    assert (p.tokens, p.windows) == (4 * SEQLEN, 4)
    expected = {"name": "non-overlapping", "seqlen": SEQLEN, "samples": 4, "stride": None, "shuffle": False,
                "seed": None, "dtype": "float32"}
    assert {k: p.protocol[k] for k in expected} == expected
    assert stats.kinds == ["sqnorm"] and all(list(k) == ["sqnorm"] for k in stats.entries.values())
    assert sorted(q.name for q in tmp_path.iterdir()) == ["stats"]  # no staging directory left


def test_one_layer_of_statistics_in_memory(models: Path, text: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """When layer i starts, layers 0..i-1 are written and no statistic of theirs is alive."""
    written: list[int] = []
    alive: list[weakref.ref] = []
    starts: list[int] = []
    write_layer, run = StatsWriter.write_layer, LayerStream.run

    def recording_write(self, index, stats, shared=None):
        written.append(index)
        alive.extend(weakref.ref(t) for kinds in stats.values() for t in kinds.values())
        return write_layer(self, index, stats, shared)

    def checking_run(self, batches, cache=None, hook=None):
        def checked(index, layer):
            gc.collect()
            assert written == list(range(index))
            assert alive if index else not alive
            assert all(ref() is None for ref in alive), f"layer {index}: an earlier statistic is alive"
            starts.append(index)
            return hook(index, layer)
        return run(self, batches, cache, checked)

    monkeypatch.setattr(StatsWriter, "write_layer", recording_write)
    monkeypatch.setattr(LayerStream, "run", checking_run)
    calibrate(_model(models, "llama"), [text], samples=4, seqlen=SEQLEN, out=tmp_path / "stats",
              batch_tokens=64)
    assert starts == [0, 1, 2] and written == [0, 1, 2]


def test_shuffle_draws_windows_by_the_seed(models: Path, text: str, tmp_path: Path) -> None:
    model = _model(models, "llama")
    tokenizer, every = load_tokenizer(model), _every_window(model, text)

    def drawn(seed: int) -> list[list[int]]:
        windows, protocol = calibration_windows(tokenizer, [text], SEQLEN, 5, True, seed)
        assert (protocol["shuffle"], protocol["seed"]) == (True, seed)
        return [w.ids.tolist() for w in windows]

    for seed in (0, 1):
        order = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:5]
        assert drawn(seed) == [every[k].tolist() for k in order]
    assert drawn(0) == drawn(0) != drawn(1)
    assert drawn(0) != [w.tolist() for w in every[:5]]
    same = [calibrate(model, [text], samples=5, seqlen=SEQLEN, shuffle=True, seed=s, kinds=["sqnorm"],
                      out=tmp_path / f"s{k}") for k, s in enumerate((3, 3, 4))]
    fingerprints = [StatsDir(p).provenance.data_fingerprint for p in same]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
    assert torch.equal(StatsDir(same[0]).read("model.layers.1.mlp.down_proj.weight", "sqnorm"),
                       StatsDir(same[1]).read("model.layers.1.mlp.down_proj.weight", "sqnorm"))


def test_cached_stats_reuses_an_entry_without_running_the_model(models: Path, data_file: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[int] = []
    run = LayerStream.run

    def counting_run(self, *args, **kwargs):
        runs.append(1)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(LayerStream, "run", counting_run)
    model, cache = _model(models, "llama"), tmp_path / "cache"
    data_file = Path(shutil.copy(data_file, tmp_path / "calib.txt"))  # changed below
    spec = {"data": str(data_file), "samples": 3, "seqlen": SEQLEN}
    first = cached_stats(model, spec, ["gram", "sqnorm"], cache)
    inode, mtime = first.stat().st_ino, (first / "manifest.json").stat().st_mtime_ns
    assert len(runs) == 1 and first.parent == cache and StatsDir(first).provenance.windows == 3
    import streammerge.calibration.calibrate as calibrate_module

    def no_reading(*args: object) -> None:
        raise AssertionError("a cache hit read the calibration data")

    with monkeypatch.context() as m:
        m.setattr(calibrate_module, "read_documents", no_reading)
        again = cached_stats(model, dict(spec), ["sqnorm", "gram"], cache)  # the kinds' order does not matter
    assert again == first and len(runs) == 1
    assert (first.stat().st_ino, (first / "manifest.json").stat().st_mtime_ns) == (inode, mtime)
    assert [p.name for p in cache.iterdir()] == [first.name]  # nothing staged, nothing new
    other = cached_stats(model, spec | {"samples": 4}, ["gram", "sqnorm"], cache)
    fewer = cached_stats(model, spec, ["sqnorm"], cache)
    assert len(runs) == 3 and len({first, other, fewer}) == 3
    monkeypatch.setenv("STREAMMERGE_CACHE", str(tmp_path / "env-cache"))
    assert cached_stats(model, spec, ["sqnorm"]).parent == tmp_path / "env-cache"
    data_file.write_text(data_file.read_text() + " river")  # the data changed: a new entry
    assert cached_stats(model, spec, ["gram", "sqnorm"], cache) != first and len(runs) == 5
    with pytest.raises(PlanError, match=r"calibration: unknown key 'stats'"):
        cached_stats(model, spec | {"stats": "dir"}, ["gram"], cache)


def test_a_second_pass_over_a_layer_keeps_the_first(tmp_path: Path, models: Path, text: str) -> None:
    """Fisher's pass writes a layer again after the Grams: both stay readable."""
    source = calibrate(_model(models, "llama"), [text], samples=2, seqlen=SEQLEN, kinds=["sqnorm"],
                       out=tmp_path / "first")
    stats = StatsDir(source)
    writer = StatsWriter(tmp_path / "both", stats.provenance, ["sqnorm", "fisher"])
    sq = stats.read("model.layers.0.mlp.down_proj.weight", "sqnorm")
    writer.write_layer(0, {"model.layers.0.mlp.down_proj.weight": {"sqnorm": sq}})
    writer.write_layer(0, {"model.layers.0.mlp.down_proj.weight": {"fisher": torch.ones(64, 96)}})
    both = StatsDir(writer.finish())
    assert torch.equal(both.read("model.layers.0.mlp.down_proj.weight", "sqnorm"), sq)
    assert torch.equal(both.read("model.layers.0.mlp.down_proj.weight", "fisher"), torch.ones(64, 96))
    assert sorted(p.name for p in both.path.iterdir()) == [
        "layer-00000-fisher.safetensors", "layer-00000-sqnorm.safetensors", "manifest.json"]


def test_a_statistics_norm_is_read_in_pieces(tmp_path: Path, models: Path, text: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """normalize_fisher's ‖F‖₂ over a whole model, read a few elements at a time: equal to the
    norm of the whole tensors in float64, a stored tensor two weights share counted once."""
    stats = StatsDir(calibrate(_model(models, "llama"), [text], samples=2, seqlen=SEQLEN, kinds=["sqnorm"],
                               out=tmp_path / "first"))
    writer = StatsWriter(tmp_path / "fisher", stats.provenance, ["gram", "fisher"])
    generator = torch.Generator().manual_seed(0)
    fisher = {"a.weight": torch.rand(13, 7, generator=generator),
              "b.bias": torch.rand(29, generator=generator)}
    gram = torch.rand(7, 7, generator=generator)
    writer.write_layer(0, {"a.weight": {"fisher": fisher["a.weight"], "gram": gram},
                           "b.bias": {"fisher": fisher["b.bias"]}})
    writer.write_layer(1, {"c.weight": {"gram": gram}}, shared={"d.weight": "c.weight"})
    directory = StatsDir(writer.finish())
    monkeypatch.setattr(statistics_module, "NORM_ELEMENTS", 10)  # 1 row of a, 10 elements of b a piece
    got = statistics_module.ModelStatistics("m", directory)
    expected = sum(float(f.double().square().sum()) for f in fisher.values()) ** 0.5
    assert got.norm("fisher") == pytest.approx(expected, rel=1e-12)
    assert got.norm("gram") == pytest.approx(2 ** 0.5 * float(gram.double().norm()), rel=1e-12)


def test_fisher_goes_into_the_same_directory(models: Path, text: str, tmp_path: Path) -> None:
    model = _model(models, "llama")
    out = calibrate(model, [text], samples=2, seqlen=SEQLEN, kinds=["gram", "fisher"], out=tmp_path / "stats")
    stats = StatsDir(out)
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    assert {n: stats.shape(n, "fisher") for n in shapes} == shapes  # every tensor, the layers' and the rest
    name = "model.layers.2.self_attn.k_proj.weight"  # the Grams' file is not overwritten by Fisher's
    assert stats.has(name, "gram") and stats.read(name, "gram").shape == (64, 64)
    # the same windows reach fisher_stats: the mean over windows of each window's squared gradient
    reference = load_reference(model)
    squares: dict[str, torch.Tensor] = {}
    for ids in _every_window(model, text)[:2]:
        reference.zero_grad()
        reference(ids[None], labels=ids[None]).loss.backward()
        for n, param in reference.named_parameters():
            squares[n] = squares.get(n, 0) + param.grad.double().square() / 2
    for n in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        got = stats.read(n, "fisher").double()
        assert (got - squares[n]).abs().max() <= 1e-5 * squares[n].abs().max(), n


def test_activations_are_all_spilled_without_max_memory(models: Path, text: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --max-memory, the layer stream's boundary activations (gram, sqnorm) and every
    layer's inputs kept for the Fisher's reverse sweep (with the windows' gradients) go to the
    spill file, so none of them sits beside two layers and their statistics; a given budget is
    used."""
    stores: dict[str, list] = {"stream": [], "fisher": []}

    def recorder(origin: str) -> type:
        class Recorded(stream_module.ActivationStore):
            def __init__(self, budget: int, directory: str | None = None):
                super().__init__(budget, directory)
                stores[origin].append(self)
        return Recorded

    monkeypatch.setattr(stream_module, "ActivationStore", recorder("stream"))
    monkeypatch.setattr(fisher_module, "ActivationStore", recorder("fisher"))
    model = _model(models, "llama")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    boundary = 2 * SEQLEN * hidden * 4  # two windows' hidden states, float32
    # the stream's store holds one boundary at a time; the Fisher's, 3 layers' inputs and gradients
    for kind, origin, spilled in (("gram", "stream", boundary), ("fisher", "fisher", 4 * boundary)):
        calibrate(model, [text], samples=2, seqlen=SEQLEN, kinds=[kind], out=tmp_path / kind)
        store = stores[origin][-1]
        assert store.budget == 0 and store.held_bytes == 0 and store.spilled_bytes >= spilled, kind
        calibrate(model, [text], samples=2, seqlen=SEQLEN, kinds=[kind], out=tmp_path / f"{kind}-given",
                  max_memory=8 << 30)
        store = stores[origin][-1]
        assert store.budget > 4 * boundary and store.spilled_bytes == 0, kind


def test_cli_writes_and_reports(models: Path, data_file: Path, tmp_path: Path) -> None:
    model, out = _model(models, "phi3"), tmp_path / "stats"
    run = CliRunner().invoke(main, ["calibrate", str(model), "--data", str(data_file), "--samples", "3",
                                    "--seqlen", str(SEQLEN), "--stats", "gram,sqnorm", "-o", str(out), "-q"])
    assert run.exit_code == 0, run.output
    stored = 0
    for i in range(3):
        with safe_open(str(out / f"layer-0000{i}-gram-sqnorm.safetensors"), "pt") as f:
            stored += len(f.keys())
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    lines = run.stdout.splitlines()
    assert lines[0] == f"model        {model}"
    assert lines[1] == f"statistics   {out}: gram, sqnorm of 12 weights"
    assert lines[2] == f"wrote        3 layers in 3 files, {stored} tensors, {size:.2f} MiB" and stored == 24
    assert lines[3] == f"windows      3 of {SEQLEN} tokens ({3 * SEQLEN} tokens), dtype float32"
    assert [line.split()[0] for line in lines[4:]] == ["seconds", "peak", "protocol"]


@pytest.mark.parametrize("args, message", [
    ([], "error: {model}: no calibration data; give --data FILE (or a dataset as name[:config]:split)\n"),
    (["--data", "{data}", "--stats", "gram,hessian"],
     "error: statistics gram,hessian: unknown kind 'hessian'; choose from gram,sqnorm,fisher\n"),
    (["--data", "{data}", "-o", "{model}"],
     "error: {model}: exists and is not a statistics directory; choose another -o (a statistics directory "
     "there is replaced)\n"),
])
def test_cli_errors(models: Path, data_file: Path, tmp_path: Path, args: list[str], message: str) -> None:
    model = _model(models, "llama")
    before = sorted(p.name for p in model.iterdir())
    args = [a.format(model=model, data=data_file) for a in args]
    output = [] if "-o" in args else ["-o", str(tmp_path / "stats")]
    run = CliRunner().invoke(main, ["calibrate", str(model), *args, *output, "-q"])
    assert (run.exit_code, run.stderr) == (1, message.format(model=model))
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "stats").exists()


def test_moe_experts_and_routers_are_named_not_measured(models: Path, text: str, tmp_path: Path) -> None:
    """transformers' Mixtral keeps its experts as 3-D tensors and routes with a bare matrix: no linears."""
    with pytest.warns(UserWarning, match=r"no gram/sqnorm statistics for mlp\.experts, mlp\.gate in each "
                                         r"decoder layer: not linear layers"):
        out = calibrate(_model(models, "mixtral"), [text], samples=2, seqlen=SEQLEN, out=tmp_path / "stats")
    names = sorted(StatsDir(out).entries)
    assert names == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(3) for p in "qkvo")


def test_max_memory_budgets_one_layer_of_statistics(models: Path, text: str, tmp_path: Path) -> None:
    from streammerge.calibration.calibrate import _stats_bytes
    from streammerge.evaluation.evaluate import open_model

    model = _model(models, "llama")
    model_dir, checkpoint = open_model(model)
    stream = LayerStream(model_dir, checkpoint, dtype=torch.float32, activation_budget=0)
    # q, k, v, o, gate, up read 64 columns, down 96; each counted as if it stored its own
    assert _stats_bytes(stream, ["gram", "sqnorm"]) == 4 * (6 * (64 * 64 + 64) + 96 * 96 + 96)
    assert _stats_bytes(stream, ["sqnorm", "fisher"]) == 4 * (6 * 64 + 96)
    checkpoint.close()
    bounded = calibrate(model, [text], samples=3, seqlen=SEQLEN, out=tmp_path / "a", max_memory=2**36)
    free = calibrate(model, [text], samples=3, seqlen=SEQLEN, out=tmp_path / "b")
    for name in StatsDir(free).entries:
        assert torch.equal(StatsDir(bounded).read(name, "gram"), StatsDir(free).read(name, "gram"))
    with pytest.raises(PlanError, match=r"--max-memory 0\.00 GiB is below what running this model takes"):
        calibrate(model, [text], samples=3, seqlen=SEQLEN, out=tmp_path / "c", max_memory=2**20)
    assert not (tmp_path / "c").exists()
