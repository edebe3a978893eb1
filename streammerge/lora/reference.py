"""References to adapted models: mergekit's ``model+adapter``, and where an adapter directory is."""

from __future__ import annotations

from pathlib import Path

from streammerge.errors import PlanError
from streammerge.io.hub import fetch_adapter, is_hub_reference
from streammerge.lora.adapter import CONFIG


def split_reference(ref: str) -> tuple[str, str | None]:
    """``model+adapter`` as (model, adapter); (ref, None) for a plain model. A directory whose
    name holds a '+' is a plain model; otherwise the first '+' at which both sides are
    directories splits, else the first '+'."""
    if "+" not in ref or Path(ref).is_dir():
        return ref, None
    for i, c in enumerate(ref):
        if c == "+" and Path(ref[:i]).is_dir() and Path(ref[i + 1 :]).is_dir():
            return ref[:i], ref[i + 1 :]
    model, _, adapter = ref.partition("+")
    return model, adapter


def resolve_adapter(ref: str, root: Path, key: str, where: str, cache_dir: str | None) -> str:
    """The absolute adapter directory: tried from the current directory, then ``root``, then the Hub."""
    path = Path(ref).expanduser()
    for candidate in (path, root / path) if not path.is_absolute() else (path,):
        if (candidate / CONFIG).is_file():
            return str(candidate.resolve())
    if is_hub_reference(ref):
        return str(fetch_adapter(ref, cache_dir))
    raise PlanError(f"{where}: {key}: adapter directory {ref!r} not found (a PEFT adapter directory holds {CONFIG}; relative "
                    "paths are tried from the current directory, then the plan's; 'org/name[@revision]' is fetched from the Hub)")
