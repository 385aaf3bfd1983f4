"""Compressors: the base protocol, the registry and one module per method."""
from . import lord, svd, whiten  # noqa: F401  (registration side effects)
from .base import (COMPRESSORS, CompressResult, Compressor, CompressorConfig, LowRankCompressor,
                   LowRankConfig, Plan, get_compressor, register)
from .stats import STATISTICS, GramStatistic, Statistic, make_statistic

__all__ = ["COMPRESSORS", "CompressResult", "Compressor", "CompressorConfig", "GramStatistic",
           "LowRankCompressor", "LowRankConfig", "Plan", "STATISTICS", "Statistic", "get_compressor",
           "make_statistic", "register"]
