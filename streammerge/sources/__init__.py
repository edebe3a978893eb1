"""Where a checkpoint's weights files come from: one interface, whatever the origin.

A weights file present on disk is read in place (``streammerge.io.reader.ShardReader``). A shard
that a Hugging Face cache snapshot (``.../snapshots/<commit>``) lacks is a ``HubShard`` of that
commit: its header is read by HTTP range requests, so planning needs headers only, and its bytes
are downloaded when a read needs them, or before a merge by ``download_inputs``.
"""

from __future__ import annotations

from pathlib import Path

from streammerge.io.hub import on_hub
from streammerge.io.reader import BinReader, ShardReader
from streammerge.sources.hub import HubShard, HubSnapshot

Shard = ShardReader | BinReader | HubShard


def open_shard(path: Path) -> Shard:
    """The weights file ``path``, on disk or on the Hub (see ``on_hub``)."""
    if on_hub(path):
        return HubShard(HubSnapshot.of(path.parent), path.name)
    return ShardReader(path) if path.suffix == ".safetensors" else BinReader(path)
