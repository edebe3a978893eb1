"""Downloading a Hub file, or a byte range of it, surviving a flaky connection.

huggingface_hub 2.4's ``hf_hub_download`` raises at the first 500, and after a connection dropped
mid-file it fetches the whole file again (checked against the test Hub). So bytes are fetched
here, through huggingface_hub's own session, URL and headers (endpoint, token and proxies as in
every other call), and a transient failure (a 5xx, 408 or 429, a timeout, a dropped connection) is
retried with exponential backoff, resuming by a ``Range`` request from the bytes received.
``fetch_file`` downloads a whole file into ``<name>.partial``, renamed into place once it has the
planned size (a partial file left by a killed run is resumed the same way); ``fetch_range`` reads
a byte range into memory, storing nothing (``--stream-inputs``). A missing repo, revision or file
is one line naming it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def _retrying(snapshot: HubSnapshot, file: str, attempt: Callable[[], None],
              received: Callable[[], int], stop: threading.Event, gave_up: str) -> bool:
    """Run ``attempt`` until it returns, again after each transient failure, with backoff; the
    count and the backoff start over once ``received()`` grew. False if ``stop`` was set first.
    ``gave_up``: what to do once the retries run out (formatted with ``got``, the bytes received)."""
    failures, wait = 0, BACKOFF
    while True:
        before = received()
        try:
            attempt()
            return not stop.is_set()
        except _Transient as e:
            if received() > before:  # progress: the count and the backoff start over
                failures, wait = 0, BACKOFF
            failures += 1
            if failures > RETRIES:
                raise CheckpointError(f"{snapshot.ref}: {file}: download failed {failures} times "
                                      f"in a row ({e}); {gave_up.format(got=received())}") from None
            if stop.wait(wait):
                return False
            wait = min(wait * 2, BACKOFF_CAP)


def fetch_file(snapshot: HubSnapshot, file: str, dest: Path, size: int,
               stop: threading.Event | None = None) -> bool:
    """Download ``file`` of ``snapshot`` to ``dest`` (``size`` bytes, as planned), resuming its
    ``.partial`` file; retried with backoff while failures are transient. False if ``stop`` was
    set first (the partial file stays, to resume from)."""
    stop = stop or threading.Event()
    partial = partial_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def received() -> int:
        return partial.stat().st_size if partial.exists() else 0

    def attempt() -> None:
        _append(snapshot, file, partial, received(), size, stop)

    if not _retrying(snapshot, file, attempt, received, stop,
                     "the same command resumes it from the {got:,} bytes received"):
        return False
    got = partial.stat().st_size
    if got != size:
        partial.unlink()
        raise CheckpointError(f"{snapshot.ref}: {file}: the Hub's file is {got:,} bytes, the "
                              f"one planned {size:,} (changed at the same commit?); run again")
    os.replace(partial, dest)
    return True


def fetch_range(snapshot: HubSnapshot, file: str, start: int, into: memoryview, size: int) -> None:
    """Bytes ``start`` to ``start + len(into)`` of ``file`` (``size`` bytes, as planned) into
    ``into``, by one ranged GET; after a transient failure, the bytes not received yet by another."""
    got = 0

    def attempt() -> None:
        nonlocal got
        end = start + len(into) - 1
        with _body(snapshot, file, start + got, end, size) as (at, pieces, _):
            if at != start + got:  # a whole shard would follow: never download it here
                raise CheckpointError(f"{snapshot.ref}: {file}: the Hub answered a range request "
                                      "with the whole file: this endpoint cannot serve byte "
                                      "ranges; drop --stream-inputs")
            for piece in pieces:
                n = min(len(piece), len(into) - got)
                into[got:got + n] = piece[:n]
                got += n
        if got < len(into):
            raise _Transient(f"{got:,} of {len(into):,} bytes received")

    if len(into):
        _retrying(snapshot, file, attempt, lambda: got, threading.Event(),
                  "run again: the merge resumes from its last finished tensor")


def fetch_span(snapshot: HubSnapshot, file: str, start: int, count: int) -> tuple[bytes, int]:
    """Bytes ``start`` to ``start + count`` of ``file`` (fewer where the file ends first) and the
    file's size, which planning's header reads do not know yet; retried as ``fetch_range``."""
    data, size = bytearray(), 0

    def attempt() -> None:
        nonlocal size
        with _body(snapshot, file, start + len(data), start + count - 1, None) as (at, pieces, size):
            if at != start + len(data):  # a whole shard would follow: never download it here
                raise CheckpointError(f"{snapshot.ref}: {file}: the Hub answered a range request "
                                      "with the whole file: this endpoint cannot serve byte ranges")
            for piece in pieces:
                data.extend(piece[:count - len(data)])
                if len(data) == count:
                    break
        if len(data) < min(count, size - start):
            raise _Transient(f"{len(data):,} of {count:,} bytes received")

    _retrying(snapshot, file, attempt, lambda: len(data), threading.Event(), "run again")
    return bytes(data), size


def _append(snapshot: HubSnapshot, file: str, partial: Path, have: int, size: int,
            stop: threading.Event) -> None:
    """Append bytes ``have`` onward of ``file`` to ``partial`` (all of it when the server ignores
    the range) until ``stop``."""
    if have >= size:  # a complete partial (killed before its rename), or longer than planned
        if have > size:
            partial.unlink()
            raise _Transient(f"a partial file longer than the {size:,} bytes planned, discarded")
        return
    with _body(snapshot, file, have, None, size) as (start, pieces, _):
        try:
            with open(partial, "r+b" if start else "wb") as f:
                f.seek(start)
                f.truncate()
                for piece in pieces:  # as received: a dropped connection loses none
                    f.write(piece)
                    if stop.is_set():
                        return
        except OSError as e:  # writing the file, not the Hub's answer
            raise OutputError(f"{partial}: cannot write a download ({e.strerror}); free space "
                              "(a --disk-budget within it keeps it free) and run again") from None


@contextmanager
def _body(snapshot: HubSnapshot, file: str, first: int, last: int | None,
          size: int | None) -> Iterator[tuple[int, Iterator[bytes], int]]:
    """A GET of bytes ``first`` to ``last`` (None: the end) of ``file``, planned at ``size`` bytes
    (None: not known yet): the offset its body starts at (0 when the server ignores the range),
    the body's pieces as they arrive, and the file's size as the Hub gives it. ``_Transient`` for
    what a retry may cure, also while the pieces are read; a one-line ``CheckpointError``
    otherwise."""
    import httpx2
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    if first or last is not None:
        headers["Range"] = f"bytes={first}-{'' if last is None else last}"
    url = hf_hub_url(snapshot.repo, file, revision=snapshot.commit)
    try:
        with get_session().stream("GET", url, headers=headers,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
            if r.status_code >= 500 or r.status_code in _TRANSIENT_STATUS:
                raise _Transient(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                r.read()  # the error's body, for huggingface_hub's message
                hf_raise_for_status(r)
            answered = r.headers.get("Content-Range", "")
            if r.status_code == 206 and not answered.startswith(f"bytes {first}-"):
                raise _Transient(f"bytes {first}- asked, Content-Range {answered!r} sent")
            total = answered.rpartition("/")[2] if r.status_code == 206 else \
                r.headers.get("Content-Length", "")
            if not total.isdigit():
                raise CheckpointError(f"{snapshot.ref}: {file}: the Hub gave no file size "
                                      f"(Content-Range {answered!r}); run again")
            if size is not None and int(total) != size:
                raise CheckpointError(f"{snapshot.ref}: {file}: the Hub's file is not the "
                                      f"{size:,} bytes planned ({total} bytes; changed at the "
                                      "same commit?); run again")
            yield (first if r.status_code == 206 else 0), r.iter_bytes(), int(total)
    except httpx2.TransportError as e:  # timeouts, refused and dropped connections
        raise _Transient(f"{type(e).__name__}: {str(e).strip() or 'no detail'}") from None
    except fetch_errors() as e:
        raise fetch_error(snapshot.ref, e, file) from None
