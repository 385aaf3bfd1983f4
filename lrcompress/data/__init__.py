"""Calibration and evaluation text -> token tensors."""
from .sources import KNOWN_DATASETS, TextSource, data_dir, load_text, locate_text
from .windows import calibration_windows, evaluation_windows, tokenize, windows_fingerprint

__all__ = ["KNOWN_DATASETS", "TextSource", "calibration_windows", "data_dir", "evaluation_windows", "locate_text",
           "load_text", "tokenize", "windows_fingerprint"]
