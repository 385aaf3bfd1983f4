"""Compressors: the base protocol, the registry and one module per method."""
from . import compot, cospadi, eora, fwsvd, gptq, lord, prune, rtn, submoe, svd, whiten  # noqa: F401  (registration side effects)
from .base import (COMPRESSORS, CompressResult, Compressor, CompressorConfig, GroupMember, LowRankCompressor,
                   LowRankConfig, Plan, RankKnob, get_compressor, register)
from .stats import SNAPSHOTS, STATISTICS, GramStatistic, OriginalWeight, Statistic, make_statistic

__all__ = ["COMPRESSORS", "CompressResult", "Compressor", "CompressorConfig", "GramStatistic", "GroupMember",
           "LowRankCompressor", "LowRankConfig", "OriginalWeight", "Plan", "RankKnob", "SNAPSHOTS", "STATISTICS",
           "Statistic", "get_compressor", "make_statistic", "register"]
