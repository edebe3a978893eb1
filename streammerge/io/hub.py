"""Models named on the Hugging Face Hub (``org/name`` or ``org/name@revision``).

Resolving a reference fetches the small files only: the config, tokenizer and generation files
and the index, at the commit its revision resolves to (once: the snapshot directory is named by
it). The shards stay on the Hub until a read needs them (``streammerge.sources.hub``), so a plan
is checked from their headers before a weight byte is downloaded. ``HF_HOME``, ``HF_HUB_OFFLINE``
and ``cache_dir`` are honoured by huggingface_hub itself, so a warm cache works without a
network. huggingface_hub is imported only when a plan names a Hub model: importing it takes
about 0.35 s of every run.
"""

from __future__ import annotations

import re
from pathlib import Path

from streammerge.errors import CheckpointError
from streammerge.io.layout import INDEX, TOKENIZER_FILES

_REF = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_SNAPSHOT = re.compile(r"(?:^|/)models--([\w.-]+?)--([\w.-]+)/snapshots/([0-9a-f]{40})/?$")


def is_hub_reference(ref: str) -> bool:
    return bool(_REF.match(ref)) and not ref.startswith((".", "/", "~"))


def snapshot_reference(path: str | Path) -> str | None:
    """``org/name@commit`` for a snapshot directory of huggingface_hub's cache
    (``.../models--org--name/snapshots/<commit>``), else None."""
    m = _SNAPSHOT.search(str(path))
    return f"{m.group(1)}/{m.group(2)}@{m.group(3)}" if m else None


def snapshot_cache(path: str | Path) -> Path | None:
    """The huggingface_hub cache directory holding snapshot directory ``path``, else None."""
    return Path(path).parents[2] if snapshot_reference(path) is not None else None


def on_hub(path: Path) -> bool:
    """Whether the weights file ``path`` is read from the Hub: a safetensors file missing from a
    cache snapshot directory (``streammerge.sources``)."""
    return (path.suffix == ".safetensors" and not path.is_file()
            and snapshot_reference(path.parent) is not None)


def fetch(ref: str, cache_dir: str | None = None) -> Path:
    """The local snapshot directory of ``ref`` (``.../snapshots/<commit>``) with its small files."""
    from huggingface_hub import snapshot_download

    repo, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache_dir,
                                      allow_patterns=["config.json", INDEX, *TOKENIZER_FILES]))
    except fetch_errors() as e:
        raise fetch_error(ref, e) from None


def fetch_adapter(ref: str, cache_dir: str | None = None) -> Path:
    """The local snapshot directory of a PEFT adapter: its config and safetensors weights."""
    from huggingface_hub import snapshot_download

    repo, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache_dir,
                                      allow_patterns=["adapter_config.json", "adapter_model.safetensors"]))
    except fetch_errors() as e:
        raise fetch_error(ref, e) from None


def fetch_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub and its HTTP client raise when a fetch fails."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    return (HfHubHTTPError, LocalEntryNotFoundError, httpx2.HTTPError, OSError, ValueError)


def fetch_error(ref: str, e: Exception, file: str | None = None) -> CheckpointError:
    """One line naming what is missing (``ref``'s repo, revision or ``file``) or what failed."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo, _, revision = ref.partition("@")
    if isinstance(e, GatedRepoError):
        reason = f"{repo} is gated: accept its conditions on the Hub, then hf auth login (or HF_TOKEN)"
    elif isinstance(e, RepositoryNotFoundError):
        reason = (f"repository {repo} not found (check the name; a private repo needs hf auth login or "
                  "HF_TOKEN)")
    elif isinstance(e, RevisionNotFoundError):
        reason = f"revision {revision or 'main'!r} of {repo} not found (a branch, tag or commit)"
    elif isinstance(e, EntryNotFoundError) and file is not None and not isinstance(e, FileNotFoundError):
        reason = f"file {file!r} not found in {repo} at {revision or 'main'}"
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = f"{type(e).__name__}: {first}" + (f", reading {file}" if file else "")
        return CheckpointError(f"{ref}: cannot fetch from the Hugging Face Hub ({reason})")
    return CheckpointError(f"{ref}: cannot fetch from the Hugging Face Hub: {reason}")
