"""Data: stream documents from text/JSONL/Parquet and prepare token shards for training."""

from .augment import AugmentConfig, run_augment
from .clean import CleanConfig, run_clean
from .dedup import DedupConfig, run_dedup
from .pii import PiiConfig, PiiMasker, run_pii
from .prepare import DataPrepareConfig, document_in_val, run_prepare, tail_split_point
from .records import conversation_problem
from .reddit import RedditConfig, run_reddit
from .reddit_synth import SynthRedditConfig, synth_reddit
from .shards import SHARDS_FORMAT, ShardWriter, load_meta, open_split, shard_dtype
from .sources import DocumentStream, RejectsWriter, Stats, detect_format, resolve_inputs

__all__ = [
    "SHARDS_FORMAT",
    "AugmentConfig",
    "CleanConfig",
    "DataPrepareConfig",
    "DedupConfig",
    "DocumentStream",
    "PiiConfig",
    "PiiMasker",
    "RedditConfig",
    "RejectsWriter",
    "ShardWriter",
    "Stats",
    "SynthRedditConfig",
    "conversation_problem",
    "detect_format",
    "document_in_val",
    "load_meta",
    "open_split",
    "resolve_inputs",
    "run_augment",
    "run_clean",
    "run_dedup",
    "run_pii",
    "run_prepare",
    "run_reddit",
    "shard_dtype",
    "synth_reddit",
    "tail_split_point",
]
