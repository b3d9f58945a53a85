"""Data pipeline: challenge token shards, the record loaders, tokenizer byte accounting, export and synthetic data.

Main names are re-exported here; see :mod:`pgolf.data.shards`, :mod:`pgolf.data.loaders`,
:mod:`pgolf.data.tokenizer`, :mod:`pgolf.data.prepare` and :mod:`pgolf.data.synthetic`.
"""

from pgolf.data.loaders import (DocumentPackedLoader, PackedBatch, SequentialLoader, ShuffledLoader,
                                cu_seqlens_from_tokens)
from pgolf.data.shards import (HEADER_BYTES, HEADER_INTS, MAGIC, VERSION, ShardError, find_shards, load_tokens,
                               load_byte_sidecar, load_validation_tokens, read_shard, shard_num_tokens,
                               write_shard)
from pgolf.data.tokenizer import (ByteTables, Tokenizer, bits_per_byte, build_byte_tables, count_bytes,
                                  normalize_text)

__all__ = [
    "MAGIC", "VERSION", "HEADER_INTS", "HEADER_BYTES", "ShardError", "write_shard", "read_shard",
    "shard_num_tokens", "find_shards", "load_tokens", "load_validation_tokens", "load_byte_sidecar",
    "SequentialLoader", "ShuffledLoader", "DocumentPackedLoader", "PackedBatch", "cu_seqlens_from_tokens",
    "ByteTables", "Tokenizer", "build_byte_tables", "count_bytes", "bits_per_byte", "normalize_text",
]
