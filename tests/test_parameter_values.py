"""Parameter values are converted as mergekit converts them: pydantic's lax mode, nothing looser.

mergekit 0.1.5 validates each value with ``TypeAdapter(kind).validate_python`` (its
``ParameterSpec.validate``) for the parameter's ``bool``, ``int`` or ``float``, after reading
gradients and ``{filter, value}`` lists. The table below is what that accepts and refuses
(pydantic 2.14.4 in mergekit's environment, 2.13.4 here: the same).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Family
from streammerge.cli import main
from streammerge.errors import PlanError
from streammerge.methods import Param
from streammerge.plan.parameters import typed
from streammerge.schedule import Schedule

REFUSED = object()
TABLE: list[tuple[type, Any, Any]] = [
    # booleans: true/false, 0/1 as int or float, and these strings in any case
    (bool, True, True), (bool, False, False), (bool, 1, True), (bool, 0, False), (bool, 1.0, True),
    (bool, 0.0, False),
    (bool, "true", True), (bool, "TRUE", True), (bool, "True", True), (bool, "false", False),
    (bool, "False", False),
    (bool, "yes", True), (bool, "YES", True), (bool, "no", False), (bool, "on", True), (bool, "On", True),
    (bool, "off", False), (bool, "1", True), (bool, "0", False), (bool, "t", True), (bool, "f", False),
    (bool, "y", True), (bool, "n", False), (bool, "N", False),
    (bool, 2, REFUSED), (bool, -1, REFUSED), (bool, 0.5, REFUSED), (bool, 2.0, REFUSED),
    (bool, "maybe", REFUSED),
    (bool, "", REFUSED), (bool, None, REFUSED), (bool, "1.0", REFUSED), (bool, " true", REFUSED),
    (bool, "enabled", REFUSED),
    # numbers: an int, a boolean, a numeric string (whitespace around it, underscores, inf and nan too)
    (float, 1, 1.0), (float, -3, -3.0), (float, True, 1.0), (float, False, 0.0), (float, "0.5", 0.5),
    (float, "5e-1", 0.5),
    (float, " 1 ", 1.0), (float, "1e3", 1000.0), (float, ".5", 0.5), (float, "+1", 1.0), (float, "-2", -2.0),
    (float, "1_000", 1000.0), (float, "  0.25\n", 0.25), (float, "inf", math.inf),
    (float, "abc", REFUSED), (float, "", REFUSED), (float, None, REFUSED), (float, "0x10", REFUSED),
    (float, "1,5", REFUSED),
    (float, "true", REFUSED), (float, "on", REFUSED),
    # integers: whole floats and numeric strings without a fraction
    (int, 2, 2), (int, 2.0, 2), (int, "3", 3), (int, "3.0", 3), (int, " 1 ", 1), (int, True, 1),
    (int, "+1", 1),
    (int, "1_000", 1000),
    (int, 2.5, REFUSED), (int, "2.5", REFUSED), (int, "1e3", REFUSED), (int, "abc", REFUSED),
    (int, None, REFUSED),
    (int, "true", REFUSED),
]


@pytest.mark.parametrize(("kind", "value", "want"), TABLE, ids=[f"{k.__name__}-{v!r}" for k, v, _ in TABLE])
def test_each_conversion(kind: type, value: Any, want: Any) -> None:
    spec = Param("p", kind)
    if want is REFUSED:
        match = "true or false" if kind is bool else "an integer" if kind is int else "a number"
        with pytest.raises(ValueError, match=match):
            typed(spec, value)
        return
    got = typed(spec, value)
    assert type(got) is kind and got == want


def test_the_table_is_what_mergekit_accepts() -> None:
    """Run mergekit's own ParameterSpec.validate over the table, in mergekit's environment
    (``scripts/mergekit_venv.sh``; MERGEKIT_PYTHON names another)."""
    default = Path(__file__).parents[1] / ".venv-mergekit" / "bin" / "python"
    python = Path(os.environ.get("MERGEKIT_PYTHON", default))
    if not python.exists():
        pytest.skip(f"mergekit's environment not found at {python}")
    script = """
import json, math, sys
from mergekit.merge_methods.base import ParameterSpec, ParameterScope
out = []
for kind, value in json.load(sys.stdin):
    try:
        spec = ParameterSpec("p", {"bool": bool, "int": int, "float": float}[kind], ParameterScope.SHARED)
        got = spec.validate(value)

        out.append(repr(got))
    except Exception:
        out.append(None)
print(json.dumps(out))
"""
    rows = [(k.__name__, v) for k, v, _ in TABLE]
    run = subprocess.run([str(python), "-c", script], input=json.dumps(rows), capture_output=True,
                         text=True, check=True)

    want = [None if w is REFUSED else repr(w) for _, _, w in TABLE]
    assert json.loads(run.stdout) == want


def _params(sched: Schedule, tensor: str) -> tuple[dict, list[dict]]:
    job = next(j for j in sched.jobs if j.name == tensor)
    return dict(job.params.globals), [dict(m) for m in job.params.models]


def _resolved(plan: dict, tensors: list[str]) -> list[tuple[dict, list[dict]]]:
    sched = streammerge.schedule(plan)
    try:
        return [_params(sched, t) for t in tensors]
    finally:
        sched.close()


Q0, Q1, Q2 = (f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3))
UP1 = "model.layers.1.mlp.up_proj.weight"


def test_every_place_a_value_is_written(fp32_family: Family) -> None:
    """Top level, a model's own, a slice's and a slice source's parameters, gradients, conditionals."""
    base, m1, m2 = (str(p) for p in (fp32_family.base, *fp32_family.models[:2]))
    plan = {"merge_method": "ties", "base_model": base,
            "parameters": {"normalize": "off", "rescale": 1, "lambda": "5e-1"},
            "models": [{"model": m1,
                        "parameters": {"weight": ["1", "0"],
                                       "density": [{"filter": "mlp", "value": "0.25"}, {"value": 1}]}},
                       {"model": m2,
                        "parameters": {"weight": True, "density": {"filter": "mlp", "value": "0.75"}}}]}
    (g, (p1, p2)), (_, (u1, u2)) = _resolved(plan, [Q1, UP1])
    assert g["normalize"] is False and g["rescale"] is True and g["lambda"] == 0.5
    assert p1 == {"weight": 0.5, "density": 1.0} and p2 == {"weight": 1.0, "density": 1.0}
    # One {filter, value} is a list of one, as mergekit reads it.
    assert u1["density"] == 0.25 and u2["density"] == 0.75
    layers = [0, 1], [1, 3]
    slices = {"merge_method": "ties", "base_model": base, "parameters": {"normalize": "yes"},
              "slices": [{"sources": [{"model": base, "layer_range": r}, {"model": m1, "layer_range": r,
                                                                          "parameters": {"weight": "2e-1"}}],
                          "parameters": {"normalize": n, "density": d}}
                         for r, n, d in zip(layers, ("0", "N"), ("0.5", "5e-1"))]}
    for g, (own,) in _resolved(slices, [Q0, Q1]):
        assert g["normalize"] is False and own == {"weight": 0.2, "density": 0.5}


def test_a_gradient_of_booleans_picks_a_value(fp32_family: Family) -> None:
    """mergekit interpolates numbers only; a list of booleans gives the value at int(t·(n − 1))."""
    base, m1 = str(fp32_family.base), str(fp32_family.models[0])
    plan = {"merge_method": "ties", "base_model": base,
            "parameters": {"normalize": ["yes", 0], "rescale": [0, 1, 1]},
            "models": [{"model": m1, "parameters": {"weight": [True, "0"]}}]}
    got = _resolved(plan, [Q0, Q1, Q2, "lm_head.weight"])
    assert [g["normalize"] for g, _ in got] == [True, True, False, True]  # t = 0, 0.5, 1; lm_head at 0
    assert [g["rescale"] for g, _ in got] == [False, True, True, False]
    assert [own["weight"] for _, (own,) in got] == [1.0, 0.5, 0.0, 1.0]  # numbers interpolate


def test_an_integer_gradient_must_land_on_integers(fp32_family: Family) -> None:
    plan = {"merge_method": "karcher", "models": [{"model": str(m)} for m in fp32_family.models[:2]],
            "parameters": {"max_iter": ["10", 20.0]}}
    assert [g["max_iter"] for g, _ in _resolved(plan, [Q0, Q1, Q2])] == [10, 15, 20]
    plan["parameters"]["max_iter"] = [10, 11]
    with pytest.raises(PlanError) as err:
        streammerge.schedule(plan)
    assert str(err.value) == ("parameters.max_iter: for tensor 'model.layers.1.input_layernorm.weight' "
                              "the gradient gives 10.5, expected an integer with 0 <= max_iter")


def test_an_empty_list_falls_through_to_the_next_scope(fp32_family: Family) -> None:
    plan = {"merge_method": "task_arithmetic", "base_model": str(fp32_family.base),
            "parameters": {"weight": 0.3},
            "models": [{"model": str(fp32_family.models[0]), "parameters": {"weight": []}}]}
    assert _resolved(plan, [Q1])[0][1] == [{"weight": 0.3}]


@pytest.mark.parametrize(("where", "value", "message"), [
    ("top", 2, "parameters.normalize: got 2, expected true or false (or yes/no, on/off, 1/0)"),
    ("top", 0.5, "parameters.normalize: got 0.5, expected true or false (or yes/no, on/off, 1/0)"),
    ("top", "maybe", "parameters.normalize: got 'maybe', expected true or false (or yes/no, on/off, 1/0)"),
    ("top", None, "parameters.normalize: got None, expected true or false (or yes/no, on/off, 1/0)"),
    ("gradient", [True, "sometimes"],
     "parameters.normalize: got 'sometimes', expected true or false (or yes/no, on/off, 1/0)"),
    ("model", "abc", "models[0].parameters.weight: got 'abc', expected a number"),
    ("conditional", [{"filter": "mlp", "value": "1,5"}],
     "models[0].parameters.weight: got '1,5', expected a number"),
    ("density", "nan", "models[0].parameters.density: got nan, expected a number with 0.0 < density <= 1.0"),
])
def test_what_mergekit_refuses_is_refused(where: str, value: Any, message: str, fp32_family: Family) -> None:
    plan = {"merge_method": "ties", "base_model": str(fp32_family.base),
            "models": [{"model": str(fp32_family.models[0]), "parameters": {"weight": 1.0}}]}
    if where in ("top", "gradient"):
        plan["parameters"] = {"normalize": value}
    else:
        plan["models"][0]["parameters"]["weight" if where != "density" else "density"] = value
    with pytest.raises(PlanError) as err:
        streammerge.schedule(plan)
    assert str(err.value) == f"plan: {message}"


def test_normalize_1_0_runs_as_normalize_true(fp32_family: Family, tmp_path: Path) -> None:
    """The issue's config: `normalize: 1.0` in a YAML file gives the bytes `normalize: true` gives."""
    plan = {"merge_method": "ties", "base_model": str(fp32_family.base), "parameters": {"normalize": True},
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                       for m in fp32_family.models[:2]]}
    (tmp_path / "true.yml").write_text(yaml.safe_dump(plan))
    (tmp_path / "one.yml").write_text(yaml.safe_dump(plan).replace("normalize: true", "normalize: 1.0"))
    assert "normalize: 1.0" in (tmp_path / "one.yml").read_text()
    for name in ("true", "one"):
        result = CliRunner().invoke(main, ["run", str(tmp_path / f"{name}.yml"), str(tmp_path / name), "-q"])
        assert result.exit_code == 0, result.output
    one, true = ((tmp_path / name / "model.safetensors").read_bytes() for name in ("one", "true"))
    assert one == true

