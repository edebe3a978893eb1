"""The layer-streamed Fisher against autograd on the whole transformers model, in float64.

The reference loads each tiny checkpoint the usual way (tests/arch_builder.py), takes each window's
mean next-token NLL over its scored positions, differentiates it by every parameter and averages the
squared gradients; its parameters are renamed to checkpoint names by rules written here (Mixtral's
fused experts split by hand, and checked against the checkpoint's own expert tensors).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from arch_builder import PAD, build_model, load_reference, sample_text
from streammerge.calibration.fisher import fisher_stats
from streammerge.evaluation.evaluate import load_tokenizer, open_model
from streammerge.evaluation.windows import Protocol, Window, cut_windows, tokenize
from streammerge.forward import LayerStream

SEQLEN = 16
EXPERTS_FLOAT64 = "eager"  # transformers' default grouped_mm experts have no float64 CPU kernel


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fisher-models")


def _model(root: Path, family: str) -> Path:
    return root / family if (root / family).is_dir() else build_model(root, family)


def _windows(model_dir: Path) -> list[Window]:
    """Three text windows, plus a shorter one that scores from position 5 and holds the padding
    token (whose embedding row gets no gradient)."""
    ids = tokenize(load_tokenizer(model_dir), [sample_text(200)], "\n\n")
    text = cut_windows(ids, Protocol(seqlen=SEQLEN, samples=3))
    odd = torch.cat([ids[100:105], torch.tensor([PAD]), ids[105:110]])
    return [*text, Window(odd, 5)]


def _checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _by_checkpoint_name(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A reference parameter (or its Fisher) under the checkpoint's names: transformers fuses
    Mixtral's experts into [experts, 2·inter, hidden] (w1 then w3) and [experts, hidden, inter] (w2)."""
    if name.endswith("mlp.experts.gate_up_proj"):
        stem, inter = name.removesuffix("mlp.experts.gate_up_proj"), value.shape[1] // 2
        return {f"{stem}block_sparse_moe.experts.{e}.{w}.weight": half for e in range(value.shape[0])
                for w, half in (("w1", value[e, :inter]), ("w3", value[e, inter:]))}
    if name.endswith("mlp.experts.down_proj"):
        stem = name.removesuffix("mlp.experts.down_proj")
        return {f"{stem}block_sparse_moe.experts.{e}.w2.weight": value[e] for e in range(value.shape[0])}
    return {name.replace("mlp.gate.", "block_sparse_moe.gate."): value}


def _reference(model_dir: Path, windows: list[Window]) -> dict[str, torch.Tensor]:
    model = load_reference(model_dir, torch.float64)
    if model.config.model_type == "mixtral":
        model.set_experts_implementation(EXPERTS_FLOAT64)
    params = dict(model.named_parameters())  # a tied head is the embedding's one parameter
    stored = _checkpoint(model_dir)
    for name, p in params.items():  # the renaming rules hold for the weights themselves
        for key, value in _by_checkpoint_name(name, p.detach()).items():
            assert torch.equal(value, stored[key].double()), key
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for w in windows:
        logits = model(w.ids[None]).logits[0].double()
        logp = torch.log_softmax(logits[w.score_from - 1:-1], dim=-1)
        loss = -logp.gather(1, w.ids[w.score_from:, None]).mean()
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                fisher[name] += g.square()
    out = {}
    for name, f in fisher.items():
        out.update(_by_checkpoint_name(name, f / len(windows)))
    return out


def _stream(model_dir: Path, budget: int) -> LayerStream:
    _, checkpoint = open_model(model_dir)
    stream = LayerStream(model_dir, checkpoint, dtype=torch.float64, activation_budget=budget)
    if stream.skeleton.model.config.model_type == "mixtral":
        stream.skeleton.model.set_experts_implementation(EXPERTS_FLOAT64)
    return stream


def _collect(stream: LayerStream, windows: list[Window]) -> tuple[list[int], dict[str, torch.Tensor]]:
    order, out = [], {}
    for index, stats in fisher_stats(stream, windows):
        order.append(index)
        for key, kinds in stats.items():
            assert list(kinds) == ["fisher"] and kinds["fisher"].dtype == torch.float32
            assert key not in out, f"{key} yielded twice"
            out[key] = kinds["fisher"]
    return order, out


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_fisher_matches_whole_model_autograd(models: Path, family: str) -> None:
    model_dir = _model(models, family)
    windows = _windows(model_dir)
    reference = _reference(model_dir, windows)
    stream = _stream(model_dir, 1 << 30)
    try:
        order, got = _collect(stream, windows)
    finally:
        stream.weights.checkpoint.close()
    assert order == [2, 1, 0, -1]  # the layers last to first, then everything outside them
    # every checkpoint tensor, by its own name: GPT-2's tied head is its embedding, stored once
    assert set(got) == set(_checkpoint(model_dir)) == set(reference)
    for key, ref in reference.items():
        assert got[key].shape == ref.shape, key
        assert ref.abs().max() > 0, key  # every tensor is reached by some window
        err = (got[key].double() - ref).abs().max() / ref.abs().max()
        assert err <= 1e-5, f"{key}: {err:.2e}"
    embedding = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    used = torch.unique(torch.cat([w.ids for w in windows]))
    unused = torch.ones(len(got[embedding]), dtype=torch.bool)
    unused[used] = False
    if family == "gpt2":  # tied: the head's gradient reaches every row
        assert (got[embedding][unused] > 0).all()
    else:  # rows no window uses, and the padding row, have no gradient
        assert unused.any() and (got[embedding][unused] == 0).all() and (got[embedding][PAD] == 0).all()
    if family == "mixtral":  # top-2 of 4 experts: the fused gradient lands on each expert's tensors
        assert got["model.layers.1.block_sparse_moe.experts.3.w3.weight"].shape == (96, 64)


def test_one_layer_at_a_time_and_spilling_changes_nothing(models: Path) -> None:
    model_dir = _model(models, "llama")
    windows = _windows(model_dir)
    results, spilled = [], []
    for budget in (1 << 30, 0):
        stream = _stream(model_dir, budget)
        loaded_at_once: list[int] = []
        alive: list[weakref.ref] = []
        load = stream.weights.load

        def counting(tensors, modules, what, load=load, stream=stream, seen=loaded_at_once, alive=alive):
            # loading a layer, what was yielded before is gone once the caller dropped it
            assert all(ref() is None for ref in alive), f"a Fisher yielded before {what} is still held"
            load(tensors, modules, what)
            seen.append(sum(any(p.device.type != "meta" for p in layer.parameters())
                            for layer in stream.skeleton.layers))

        prepare = stream.prepare

        def checked(*args, prepare=prepare, alive=alive, **kwargs):  # the embedding pass runs prepare
            assert all(ref() is None for ref in alive), "a layer's Fisher is still held in the embedding pass"
            return prepare(*args, **kwargs)

        stream.weights.load, stream.prepare = counting, checked
        got = {}
        try:
            for _, stats in fisher_stats(stream, windows):
                alive[:] = [weakref.ref(kinds["fisher"]) for kinds in stats.values()]
                got.update({k: v["fisher"].clone() for k, v in stats.items()})
                del stats
        finally:
            stream.weights.checkpoint.close()
        assert loaded_at_once == [1] * 6  # 3 layers forward, 3 in the sweep, one at a time
        results.append(got)
        spilled.append(stream.spilled_bytes)
    assert spilled[0] == 0 and spilled[1] > 0
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
