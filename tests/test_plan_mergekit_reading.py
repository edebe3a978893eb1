"""Published configs that mergekit's schema reads leniently: a `parameters:` key whose entries are
all commented out (null), and `{filter, value}` conditionals carrying a key mergekit ignores
(`pattern:` for `filter:`), which then match every tensor as mergekit's do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import streammerge
from checkpoint_builder import Family
from streammerge.errors import PlanError
from streammerge.plan.load import PlanWarning


def _merged(plan_text: str, tmp_path: Path, name: str) -> bytes:
    (tmp_path / f"{name}.yml").write_text(plan_text)
    streammerge.merge(tmp_path / f"{name}.yml", tmp_path / name, quiet=True)
    return (tmp_path / name / "model.safetensors").read_bytes()


def test_null_parameters_mean_none(fp32_family: Family, tmp_path: Path) -> None:
    models = "".join(f"  - model: {m}\n    parameters:\n" for m in fp32_family.models[:2])
    null = f"merge_method: karcher\nmodels:\n{models}parameters:\n  #normalize: false\ndtype: float32\n"
    assert yaml.safe_load(null)["parameters"] is None
    assert yaml.safe_load(null)["models"][0]["parameters"] is None
    plain_models = "".join(f"  - model: {m}\n" for m in fp32_family.models[:2])
    plain = f"merge_method: karcher\nmodels:\n{plain_models}dtype: float32\n"
    assert _merged(null, tmp_path, "null") == _merged(plain, tmp_path, "plain")


def test_conditional_keys_mergekit_ignores_warn_and_match_everything(fp32_family: Family,
                                                                     tmp_path: Path) -> None:
    base, ft = fp32_family.base, fp32_family.models[0]
    head = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft}\n"
    pattern = head + ("parameters:\n  t:\n    - pattern: self_attn\n      value: [0, 0.5, 1]\n"
                      "    - pattern: mlp\n      value: [1, 0.5, 0]\n    - value: 0.5\n")
    with pytest.warns(PlanWarning, match=r"parameters\.t\[0\]\.pattern: unknown key; it has no effect"):
        got = _merged(pattern, tmp_path, "pattern")
    assert got == _merged(head + "parameters:\n  t: [0, 0.5, 1]\n", tmp_path, "first")
    (tmp_path / "strict.yml").write_text(pattern)
    with pytest.raises(PlanError, match=r"parameters\.t\[0\]\.pattern: unknown key"):
        streammerge.merge(tmp_path / "strict.yml", tmp_path / "strict", quiet=True, strict=True)
