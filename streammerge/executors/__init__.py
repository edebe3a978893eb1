"""Where a schedule's tensors are merged: ``local`` (threads in this process) or ``ray`` (a Ray
task per output shard, or group of shards, on a cluster).

Both run the same work: ``local.merge_weights`` over a schedule, or over the part of it that
writes a task's shards (``Schedule.of_shards``). Every tensor's place in its shard is planned
before any data is read, so tasks write their shards without talking to each other, and the
output is the same bytes whichever executor wrote it. Only the run that built the schedule
writes the index, config, tokenizer, manifest and card, and renames the output into place.
"""
