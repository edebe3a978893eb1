"""`streammerge moe`: mixtures of experts built from mergekit-moe configs equal mergekit-moe 0.1.5's
(tests/data/golden_moe_build, made by scripts/make_moe_goldens.py), load in transformers with the
reference's logits, resume after a kill and verify."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_output
from moe_build_cases import CASES, GOLDEN, Case
from moe_builder import MoEArch, fused_state_dict
from safetensors.torch import load_file

from streammerge.cli import main, moe_main
from streammerge.errors import CheckpointError, PlanError
from streammerge.moe import build_moe
from streammerge.verify import verify

ROOT = Path(__file__).resolve().parent.parent
FUSED = {
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
}  # mergekit writes these in transformers 5's layout


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per case, lazily: (config file, streammerge's output)."""
    cache: dict[str, tuple[Path, Path]] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> tuple[Path, Path]:
            root = tmp_path_factory.mktemp(name)
            case = CASES[name]
            config = case.config(root)
            out = root / "out"
            build_moe(config, out, quiet=True, seed=case.seed or 0)
            self[name] = (config, out)
            return self[name]

    return Lazy(cache)


def _mergekit_layout(
    case: Case, tensors: dict[str, torch.Tensor], experts: int
) -> dict[str, torch.Tensor]:
    """streammerge's per-expert output in the layout mergekit-moe 0.1.5 writes it."""
    if case.output_type not in FUSED:
        return tensors
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers."))
    return fused_state_dict(
        MoEArch(FUSED[case.output_type], layers=layers, experts=experts), tensors
    )


def _golden(name: str) -> dict[str, list]:
    return json.loads((GOLDEN / name / "tensors.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_tensors_and_config_equal_mergekit(built: dict, name: str) -> None:
    """Every tensor mergekit-moe wrote, byte for byte (routers included), and its config.json; with
    noise_scale, every tensor but the noised expert's (mergekit's noise is unseeded)."""
    case, (_, out) = CASES[name], built[name]
    golden = _golden(name)
    ours = _mergekit_layout(case, load_output(out), case.experts)
    assert sorted(ours) == sorted(golden)
    compared = {
        k: v for k, v in golden.items() if not ("noise_scale" in case.extra and ".experts." in k)
    }
    differ = [
        k
        for k, (dtype, shape, sha) in compared.items()
        if (str(ours[k].dtype).removeprefix("torch."), list(ours[k].shape), _sha(ours[k]))
        != (dtype, shape, sha)
    ]
    assert differ == []
    assert len(compared) >= len(golden) - 6
    config = json.loads((out / "config.json").read_text())
    want = json.loads((GOLDEN / name / "config.json").read_text())
    want.pop("_name_or_path", None)  # DeepSeek: the path mergekit's base was built at
    if "layer_types" in want and not want.get(
        "use_sliding_window", True
    ):  # mergekit's sliding layers
        want["layer_types"] = ["full_attention"] * len(
            want["layer_types"]
        )  # without a window: full
    assert config == want


@pytest.mark.parametrize("name", ["llama_hidden", "mistral_hidden_avg", "qwen2_shared_hidden"])
def test_hidden_router_rows_within_1e5_of_mergekit(built: dict, name: str) -> None:
    """gate_mode hidden runs the base a layer at a time; each router row is within 1e-5 (relative)."""
    out = load_output(built[name][1])
    golden = load_file(str(GOLDEN / name / "routers.safetensors"))
    assert golden
    for k, want in golden.items():
        got = out[
            k.replace(".mlp.", ".block_sparse_moe.") if CASES[name].output_type == "mixtral" else k
        ]
        rel = (got.double() - want.double()).norm(dim=-1) / want.double().norm(dim=-1)
        assert rel.max().item() <= 1e-5, k


def test_random_gates_same_seed_same_bytes_and_mergekit_moments(
    built: dict, tmp_path: Path
) -> None:
    """random: the same seed gives the same bytes, another seed other gates; the draw is N(0, 1)
    as mergekit's is (here even its bytes: the golden is mergekit-moe --random-seed 7)."""
    config, first = built["mistral_random"]
    again, other = tmp_path / "again", tmp_path / "other"
    build_moe(config, again, quiet=True, seed=7)
    build_moe(config, other, quiet=True, seed=8)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    gates = [k for k in load_output(first) if k.endswith(".gate.weight")]
    ours, elsewhere = load_output(first), load_output(other)
    assert all(not torch.equal(ours[k], elsewhere[k]) for k in gates)
    mergekit = torch.cat(
        [
            v.flatten().double()
            for v in load_file(str(GOLDEN / "mistral_random" / "routers.safetensors")).values()
        ]
    )
    drawn = torch.cat([ours[k].flatten().double() for k in gates])
    assert abs(drawn.mean().item()) < 0.15 and abs(drawn.std().item() - 1) < 0.15
    assert abs(drawn.std().item() - mergekit.std().item()) < 0.15


def test_uniform_random_gates_are_linear_init(built: dict) -> None:
    out = load_output(built["llama_uniform_random"][1])
    gates = torch.cat([v.flatten() for k, v in out.items() if k.endswith(".gate.weight")])
    assert gates.abs().max().item() <= 64**-0.5 and gates.std().item() > 0.5 * 64**-0.5 / 3**0.5


def test_noise_is_seeded_and_has_mergekit_moments(built: dict, tmp_path: Path) -> None:
    """noise_scale adds N(0, s^2) draws to the expert's weights: the same seed the same bytes; the
    draws' mean and deviation as mergekit's (noise.json)."""
    config, out = built["llama_noise"]
    build_moe(config, tmp_path / "again", quiet=True, seed=5)
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()
    doc = yaml.safe_load(config.read_text())
    source = load_file(str(Path(doc["experts"][1]["source_model"]) / "model.safetensors"))
    tensors = load_output(out)
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    z = torch.cat(
        [
            (
                tensors[k].double()
                - source[f"model.layers.{k.split('.')[2]}.mlp.{names[k.split('.')[-2]]}.weight"]
            ).flatten()
            / 0.25
            for k in tensors
            if ".experts.1." in k
        ]
    )
    mergekit = json.loads((GOLDEN / "llama_noise" / "noise.json").read_text())
    assert z.numel() == mergekit["count"]
    assert abs(z.mean().item()) < 0.02 and abs(z.mean().item() - mergekit["mean"]) < 0.03
    assert abs(z.std().item() - mergekit["std"]) < 0.02


def _reference_state(case: Case, config: Path, name: str) -> dict[str, torch.Tensor]:
    """What the MoE should hold, built here from the inputs and mergekit's routers (golden), in
    the published per-expert layout."""
    doc = yaml.safe_load(config.read_text())
    base = load_file(str(Path(doc["base_model"]) / "model.safetensors"))
    experts = [
        load_file(str(Path(e["source_model"]) / "model.safetensors")) for e in doc["experts"]
    ]
    routers = load_file(str(GOLDEN / name / "routers.safetensors"))
    mixtral = case.output_type == "mixtral"
    out = {k: v for k, v in base.items() if ".mlp." not in k}
    for k, v in routers.items():
        out[k.replace(".mlp.", ".block_sparse_moe.") if mixtral else k] = v
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    for e, (spec, tensors) in enumerate(zip(doc["experts"], experts)):
        for k, v in tensors.items():
            if ".mlp." not in k:
                continue
            layer, proj = k.split(".")[2], k.split(".")[-2]
            scale = spec.get("residual_scale") if proj == "down_proj" else None
            v = v * scale if scale is not None else v
            target = (
                f"model.layers.{layer}.block_sparse_moe.experts.{e}.{names[proj]}.weight"
                if mixtral
                else f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
            )
            out[target] = v
    for k, v in base.items() if case.shared else ():
        if ".mlp." in k:
            out[k.replace(".mlp.", ".mlp.shared_expert.")] = v
    if case.output_type == "qwen2_moe":  # Qwen2-MoE's attention biases: the base's, else zeros
        for k in [k for k in out if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
            out.setdefault(k.removesuffix("weight") + "bias", torch.zeros(out[k].shape[0]))
    return out


@pytest.mark.parametrize(
    "name",
    [
        "llama_cheap_embed",
        "mistral_random",
        "llama_hidden",
        "qwen2_shared_hidden",
        "llama_qwen_shared",
        "qwen3_cheap_embed",
    ],
)
def test_loads_in_transformers_with_the_reference_logits(built: dict, name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    case, (config, out) = CASES[name], built[name]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(out), dtype=torch.float32
    ).eval()
    state = _reference_state(case, config, name)
    arch = MoEArch(FUSED.get(case.output_type, "qwen3_moe"), layers=3, experts=case.experts)
    dtype = getattr(torch, json.loads((GOLDEN / name / "config.json").read_text())["dtype"])
    reference.load_state_dict(
        {k: v.to(dtype).float() for k, v in fused_state_dict(arch, state).items()}, strict=True
    )
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 7, 2, 40, 41]])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    # equal up to float32 summation order (the loaded experts' strides can pick another matmul path)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_verify_passes_and_the_staging_is_gone(built: dict) -> None:
    out = built["llama_cheap_embed"][1]
    problems, checked = verify(out)
    assert problems == [] and checked["tensors"] == len(load_output(out)) == 21 + 3 * (1 + 3 * 3)
    assert not (out.parent / f".{out.name}.streammerge-partial").exists()
    assert not (out / "moe-computed").exists()


def test_resumes_after_a_kill_to_the_same_bytes(built: dict, tmp_path: Path) -> None:
    """SIGKILLed after its 20th tensor is journalled, the build resumes to an uninterrupted run's bytes."""
    config, whole = built["llama_hidden"]
    out = tmp_path / "out"
    child = (
        "import sys; sys.path.insert(0, 'tests'); from crash_child import kill_after; "
        "from streammerge.journal import Journal; kill_after(Journal, 'record', 20); "
        "from streammerge.moe import build_moe; "
        f"build_moe({str(config)!r}, {str(out)!r}, quiet=True); sys.exit(3)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
    }  # this checkout's streammerge, not an installed one
    killed = subprocess.run(
        [sys.executable, "-c", child],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    staging = tmp_path / ".out.streammerge-partial"
    assert staging.is_dir() and not out.exists()
    result = build_moe(config, out, quiet=True)
    assert any("resumed: 20 of" in n for n in result.notes)
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert verify(out)[0] == []


def test_chunked_copies_and_noise_give_the_same_bytes(built: dict, tmp_path: Path) -> None:
    """In chunks of 7 rows (as a small --max-memory cuts them) the output is the same bytes, the
    counter-based noise included."""
    config, whole = built["llama_noise"]
    build_moe(config, tmp_path / "out", quiet=True, seed=5, chunk_size=7 * 64)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        whole / "model.safetensors"
    ).read_bytes()


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output
    return lines[-1]


def test_errors_are_one_line(built: dict, tmp_path: Path) -> None:
    config, _ = built["llama_cheap_embed"]
    doc = yaml.safe_load(config.read_text())
    unknown = _write(tmp_path / "a.yml", doc | {"architecture": "switch"})
    assert "unknown output architecture 'switch'" in _error(
        ["moe", str(unknown), str(tmp_path / "o1")]
    )
    no_prompts = _write(
        tmp_path / "b.yml",
        doc
        | {
            "gate_mode": "hidden",
            "experts": [
                {k: v for k, v in e.items() if k != "positive_prompts"} for e in doc["experts"]
            ],
        },
    )
    line = _error(["moe", str(no_prompts), str(tmp_path / "o2")])
    assert "experts[0]" in line and "positive_prompts" in line
    qwen3 = _write(tmp_path / "c.yml", doc | {"architecture": "qwen3"})
    assert "Qwen3 MoE builds from qwen3 models only" in _error(
        ["moe", str(qwen3), str(tmp_path / "o3")]
    )
    assert not any((tmp_path / f"o{k}").exists() for k in (1, 2, 3))


def test_an_expert_of_other_shapes_is_named(built: dict, tmp_path: Path) -> None:
    from arch_builder import build_model
    from transformers import AutoConfig

    config, _ = built["llama_cheap_embed"]
    doc = yaml.safe_load(config.read_text())
    wide = build_model(tmp_path / "wide", "llama", seed=9)
    cfg = AutoConfig.from_pretrained(wide)
    assert cfg.intermediate_size == 96
    tensors = load_file(str(wide / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    from safetensors.torch import save_file

    save_file(tensors, str(wide / "model.safetensors"), metadata={"format": "pt"})
    doc["experts"][2]["source_model"] = str(wide)
    with pytest.raises(
        CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is \[100, 64\]"
    ):
        build_moe(_write(tmp_path / "w.yml", doc), tmp_path / "out", quiet=True)
    with pytest.raises(PlanError, match="every expert is"):
        same = doc | {
            "experts": [
                dict(e, source_model=doc["experts"][0]["source_model"]) for e in doc["experts"]
            ]
        }
        build_moe(_write(tmp_path / "s.yml", same), tmp_path / "out", quiet=True)


def test_streammerge_moe_takes_mergekit_moe_options(built: dict, tmp_path: Path) -> None:
    """mergekit-moe's command line: --random-seed, --out-shard-size (several shards here), and
    options with nothing to do, each with a note."""
    config, first = built["mistral_random"]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        moe_main,
        [
            str(config),
            str(out),
            "--random-seed",
            "7",
            "--out-shard-size",
            "100K",
            "--lazy-unpickle",
            "--load-in-8bit",
            "--copy-tokenizer",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "note: --lazy-unpickle" in result.output
        and "note: --load-in-4bit/--load-in-8bit" in result.output
    )
    assert len(list(out.glob("*.safetensors"))) > 1 and verify(out)[0] == []
    ours, want = load_output(out), load_output(first)
    assert sorted(ours) == sorted(want) and all(torch.equal(ours[k], want[k]) for k in want)
    assert (out / "tokenizer.json").is_file() and (out / "mergekit_moe_config.yml").is_file()


def test_tokenizer_source_and_unknown_keys(built: dict, tmp_path: Path) -> None:
    """tokenizer_source: the tokenizer files come from that model; a key mergekit-moe does not read
    is ignored, as there, with a warning naming it."""
    import shutil

    config, _ = built["llama_cheap_embed"]
    doc = yaml.safe_load(config.read_text())
    donor = tmp_path / "donor"
    shutil.copytree(Path(doc["base_model"]), donor)
    (donor / "tokenizer_config.json").write_text(json.dumps({"marker": "donor"}))
    doc |= {"tokenizer_source": str(donor), "merge_method": "linear"}
    with pytest.warns(UserWarning, match="merge_method: not a mergekit-moe key"):
        build_moe(_write(tmp_path / "t.yml", doc), tmp_path / "out", quiet=True)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"marker": "donor"}
    del doc["merge_method"]
    union = _write(tmp_path / "u.yml", doc | {"tokenizer_source": "union"})
    with pytest.raises(PlanError, match="tokenizer_source: union builds a vocabulary"):
        build_moe(union, tmp_path / "out2", quiet=True)
    assert not (tmp_path / "out2").exists() and not (tmp_path / ".out2.streammerge-partial").exists()


def test_a_base_without_tokenizer_is_named(built: dict, tmp_path: Path) -> None:
    import shutil

    config, _ = built["llama_cheap_embed"]
    doc = yaml.safe_load(config.read_text())
    bare = tmp_path / "bare"
    shutil.copytree(Path(doc["base_model"]), bare, ignore=shutil.ignore_patterns("tokenizer*"))
    cfg = _write(tmp_path / "b.yml", doc | {"base_model": str(bare)})
    line = _error(["moe", str(cfg), str(tmp_path / "out")])
    assert str(bare) in line and "tokenized with the base's tokenizer" in line
    random = _write(tmp_path / "r.yml", doc | {"base_model": str(bare), "gate_mode": "random"})
    build_moe(random, tmp_path / "out", quiet=True)  # random gates need no tokenizer


def test_an_impossible_budget_fails_before_writing_and_the_one_it_names_builds(built: dict,
                                                                              tmp_path: Path) -> None:
    """--max-memory bounds a build as it bounds a merge: too small a budget fails at planning,
    naming the smallest that works, which then builds (in fresh processes, as a user runs them)."""
    import re

    config, whole = built["llama_cheap_embed"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def moe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "streammerge", "moe", str(config), *args], check=False,
                              capture_output=True, text=True, env=env, timeout=300)

    refused = moe(str(tmp_path / "a"), "--max-memory", "1000")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    smallest = re.search(r"pass --max-memory (\d+)MiB or more", refused.stderr)
    assert smallest, refused.stderr
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory
    done = moe(str(tmp_path / "b"), "--max-memory", f"{smallest.group(1)}MiB", "-q")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_degenerate_routers_are_named() -> None:
    """mergekit-moe's warning: a layer whose router rows are nearly parallel (condition number > 5)."""
    from streammerge.moe.routers import degenerate_layers

    g = torch.Generator().manual_seed(0)
    fine = torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=-1)
    alike = torch.stack([fine[0], fine[0] + 0.01 * fine[1], fine[2]])
    assert degenerate_layers(torch.stack([fine, alike, fine])) == [1]


def test_hidden_gates_run_within_max_memory(built: dict, tmp_path: Path) -> None:
    """gate_mode hidden's layer stream is held to --max-memory too: refused below two layers'
    worth, and under a budget that fits, the same bytes."""
    config, whole = built["llama_hidden"]
    with pytest.raises(PlanError, match="below what running this model takes"):
        build_moe(config, tmp_path / "small", quiet=True, max_memory=1000)
    assert list(tmp_path.iterdir()) == []
    build_moe(config, tmp_path / "out", quiet=True, max_memory=64 << 30)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_a_base_named_on_the_hub(built: dict, tmp_path: Path) -> None:
    """base_model: org/name resolves through huggingface_hub (here its cache, offline) as in a plan;
    its config and tokenizer come with it."""
    from conftest import hub_cache

    config, whole = built["llama_cheap_embed"]
    doc = yaml.safe_load(config.read_text())
    commit = "1" * 40
    home = hub_cache(tmp_path / "hf", "acme/moe-base", {commit: Path(doc["base_model"])}, {"main": commit})
    cfg = _write(tmp_path / "hub.yml", doc | {"base_model": "acme/moe-base"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "streammerge", "moe", str(cfg), str(tmp_path / "out"), "-q"],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
