"""WebDataset shards: the ``webdataset`` data source, its index, the shard writer and the node-local copy.

- :mod:`~scaleclr.data.shards.index`: shard lists (folder / brace notation) and the index of member offsets;
- :mod:`~scaleclr.data.shards.source`: :class:`ShardSource`, random access by global sample index;
- :mod:`~scaleclr.data.shards.writer`: ``python -m scaleclr.data.shards write SRC OUT`` (ImageFolder or file list);
- :mod:`~scaleclr.data.shards.local_copy`: ``COPY_TO_LOCAL_DISK``, one copier per node.

No third-party WebDataset code is needed to read or write: shards are plain tar files in WebDataset's layout.
"""
from scaleclr.data.shards.index import IMAGE_EXTS, ShardError, ShardIndex, expand_shards, is_shard_spec
from scaleclr.data.shards.local_copy import copy_to_local
from scaleclr.data.shards.source import ShardSource, shard_lengths

__all__ = ["IMAGE_EXTS", "ShardError", "ShardIndex", "ShardSource", "copy_to_local", "expand_shards",
           "is_shard_spec", "shard_lengths"]
