"""The record in every output that reproduces its merge.

``streammerge_plan.yaml`` is the plan as it ran: every key (defaults included), every method
parameter (defaults written into the top-level ``parameters``, where they rank last), models by
their resolved references (a Hub model as ``org/name@commit``), and ``inputs:``, each model's
revision and weights files' sizes and header sha256s, which ``streammerge run`` checks before
merging again. ``merge_config.json`` holds what differs between runs (streammerge's version and
the time) with the same inputs. ``output`` is left out: a rerun names its own; so is the
executor, which changes where the merge runs, not a byte of it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import yaml

from streammerge.io.hub import snapshot_reference
from streammerge.io.writer import StagedOutput
from streammerge.lora.reference import split_reference
from streammerge.methods import get_method
from streammerge.plan.schema import EXECUTION_KEYS
from streammerge.schedule import Schedule

PLAN_FILE = "streammerge_plan.yaml"
CONFIG_FILE = "merge_config.json"


def _hub_references(references: tuple[str, ...]) -> dict[str, str]:
    """Local snapshot directories of the inputs (adapters included) and their ``org/name@commit``."""
    parts = [p for ref in references for p in split_reference(ref) if p is not None]
    return {p: hub for p in parts if (hub := snapshot_reference(p)) is not None}


def _published(value: Any, hub: dict[str, str]) -> Any:
    """``value`` (a dumped plan) with snapshot directories, alone or in ``model+adapter``, as Hub
    references."""
    if isinstance(value, dict):
        return {_published(k, hub): _published(v, hub) for k, v in value.items()}
    if isinstance(value, list):
        return [_published(v, hub) for v in value]
    if isinstance(value, str) and hub:
        model, adapter = split_reference(value)
        if model in hub or adapter in hub:
            return "+".join(hub.get(p, p) for p in (model, adapter) if p is not None)
    return value


def inputs(schedule: Schedule) -> dict[str, dict[str, Any]]:
    """Per model reference (as the record writes it): its Hub revision (None for a local model)
    and its weights files' [size, header sha256]."""
    hub = _hub_references(schedule.references)
    out: dict[str, dict[str, Any]] = {}
    for ref, ckpt in zip(schedule.references, schedule.checkpoints):
        published = _published(ref, hub)
        revisions = [hub[p].partition("@")[2] for p in split_reference(ref) if p in hub]
        files = {f: list(v) for f, v in sorted(ckpt.fingerprint().items())}
        out[published] = {"revision": "+".join(revisions) or None, "files": files}
    return out


def recorded_plan(schedule: Schedule) -> dict[str, Any]:
    """The plan that reproduces ``schedule``'s output, as ``streammerge_plan.yaml`` holds it."""
    plan = schedule.plan
    data = plan.model_dump(mode="json", exclude_none=True, exclude={"output", "inputs", *EXECUTION_KEYS})
    defaults = {p.name: p.default for p in get_method(plan.merge_method).params if p.default is not None}
    data["parameters"] = {**defaults, **data.get("parameters", {})}
    data = _published(data, _hub_references(schedule.references))
    return {**data, "inputs": inputs(schedule)}


def write_record(schedule: Schedule, staged: StagedOutput, version: str) -> None:
    """``streammerge_plan.yaml`` and ``merge_config.json`` into the staging directory."""
    plan = recorded_plan(schedule)
    staged.write_text(PLAN_FILE, yaml.safe_dump(plan, sort_keys=False, allow_unicode=True))
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    staged.write_text(CONFIG_FILE, json.dumps({"streammerge_version": version, "created": created,
                                               "merge_method": plan["merge_method"], "plan": PLAN_FILE,
                                               "inputs": plan["inputs"]}, indent=2) + "\n")
