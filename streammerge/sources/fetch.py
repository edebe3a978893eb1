"""Downloading one Hub file into a folder of the engine's own, surviving a flaky connection.

huggingface_hub 2.4's ``hf_hub_download`` raises at the first 500, and after a connection dropped
mid-file it fetches the whole file again (checked against the test Hub). So the file is fetched
here, through huggingface_hub's own session, URL and headers (endpoint, token and proxies as in
every other call): into ``<name>.partial``, appended to from its size by a ``Range`` request after
a transient failure (a 5xx, 408 or 429, a timeout, a dropped connection), with exponential backoff
between tries, then renamed into place once it has the planned size. A partial file left by a
killed run is resumed the same way. A missing repo, revision or file is one line naming it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge.errors import CheckpointError, OutputError
from streammerge.io.hub import fetch_error, fetch_errors

if TYPE_CHECKING:
    from streammerge.sources.hub import HubSnapshot

RETRIES = 5  # retries in a row, without a byte received in between, before giving up
BACKOFF = 0.5  # seconds before the first retry; doubled after each failure in a row
BACKOFF_CAP = 8.0  # so a run gives up within about 16 s of waiting once the Hub stays down
_TRANSIENT_STATUS = {408, 429}


class _Transient(Exception):
    """A failure worth retrying, with the reason to give if the retries run out."""


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def fetch_file(snapshot: HubSnapshot, file: str, dest: Path, size: int,
               stop: threading.Event | None = None) -> bool:
    """Download ``file`` of ``snapshot`` to ``dest`` (``size`` bytes, as planned), resuming its
    ``.partial`` file; retried with backoff while failures are transient. False if ``stop`` was
    set first (the partial file stays, to resume from)."""
    stop = stop or threading.Event()
    partial = partial_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures, wait = 0, BACKOFF
    while True:
        have = partial.stat().st_size if partial.exists() else 0
        try:
            _get(snapshot, file, partial, have, size, stop)
        except _Transient as e:
            got = partial.stat().st_size if partial.exists() else 0
            if got > have:  # progress: the count and the backoff start over
                failures, wait = 0, BACKOFF
            failures += 1
            if failures > RETRIES:
                raise CheckpointError(f"{snapshot.ref}: {file}: download failed {failures} times "
                                      f"in a row ({e}); the same command resumes it from the "
                                      f"{got:,} bytes received") from None
            if stop.wait(wait):
                return False
            wait = min(wait * 2, BACKOFF_CAP)
            continue
        if stop.is_set():
            return False
        got = partial.stat().st_size
        if got != size:
            partial.unlink()
            raise CheckpointError(f"{snapshot.ref}: {file}: the Hub's file is {got:,} bytes, the "
                                  f"one planned {size:,} (changed at the same commit?); run again")
        os.replace(partial, dest)
        return True


def _get(snapshot: HubSnapshot, file: str, partial: Path, have: int, size: int,
         stop: threading.Event) -> None:
    """Append bytes ``have`` onward of ``file`` to ``partial`` (all of it when the server ignores
    the range) until ``stop``; ``_Transient`` for what a retry may cure, a one-line
    ``CheckpointError`` otherwise."""
    import httpx2
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if have >= size:  # a complete partial (killed before its rename), or longer than planned
        if have > size:
            partial.unlink()
            raise _Transient(f"a partial file longer than the {size:,} bytes planned, discarded")
        return
    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    url = hf_hub_url(snapshot.repo, file, revision=snapshot.commit)
    try:
        with get_session().stream("GET", url, headers=headers,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
            if r.status_code >= 500 or r.status_code in _TRANSIENT_STATUS:
                raise _Transient(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                r.read()  # the error's body, for huggingface_hub's message
                hf_raise_for_status(r)
            start = have if r.status_code == 206 else 0  # a 200 is the whole file again
            answered = r.headers.get("Content-Range", "")
            if r.status_code == 206 and not answered.startswith(f"bytes {have}-"):
                raise _Transient(f"bytes {have}- asked, Content-Range {answered!r} sent")
            with open(partial, "r+b" if start else "wb") as f:
                f.seek(start)
                f.truncate()
                for piece in r.iter_bytes():  # as received: a dropped connection loses none
                    f.write(piece)
                    if stop.is_set():
                        return
    except httpx2.TransportError as e:  # timeouts, refused and dropped connections
        raise _Transient(f"{type(e).__name__}: {str(e).strip() or 'no detail'}") from None
    except fetch_errors() as e:
        if isinstance(e, OSError) and e.errno is not None:  # writing the file, not the Hub's answer
            raise OutputError(f"{partial}: cannot write a download ({e.strerror}); free space "
                              "(a --disk-budget within it keeps it free) and run again") from None
        raise fetch_error(snapshot.ref, e, file) from None
