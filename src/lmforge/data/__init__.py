"""Data: stream documents from text/JSONL/Parquet and prepare token shards for training."""

from .prepare import DataPrepareConfig, document_in_val, run_prepare, tail_split_point
from .shards import SHARDS_FORMAT, ShardWriter, load_meta, open_split, shard_dtype
from .sources import DocumentStream, RejectsWriter, Stats, detect_format, resolve_inputs

__all__ = [
    "SHARDS_FORMAT",
    "DataPrepareConfig",
    "DocumentStream",
    "RejectsWriter",
    "ShardWriter",
    "Stats",
    "detect_format",
    "document_in_val",
    "load_meta",
    "open_split",
    "resolve_inputs",
    "run_prepare",
    "shard_dtype",
    "tail_split_point",
]
