"""Calibration and evaluation text -> token tensors."""
from .sources import KNOWN_DATASETS, DatasetRef, TextSource, check_source, data_dir, load_text
from .windows import calibration_windows, evaluation_windows, tokenize, windows_fingerprint

__all__ = ["KNOWN_DATASETS", "DatasetRef", "TextSource", "calibration_windows", "check_source", "data_dir",
           "evaluation_windows", "load_text", "tokenize", "windows_fingerprint"]
