import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from helpers import missing_data, save_tiny  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Caches (converted GGUF, dense baselines) go to a temporary directory, never the user's home."""
    previous = os.environ.get("LRCOMPRESS_CACHE")
    os.environ["LRCOMPRESS_CACHE"] = str(tmp_path_factory.mktemp("lrcompress-cache"))
    yield
    if previous is None:
        os.environ.pop("LRCOMPRESS_CACHE", None)
    else:
        os.environ["LRCOMPRESS_CACHE"] = previous


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data directory ($LRCOMPRESS_DATA, set by the Makefile). Missing, it fails the tests that
    need it under CI or ``make test`` (``data_required``) and skips them otherwise (``make test-fast``)."""
    path, missing, required = missing_data(os.environ, Path(__file__).resolve().parents[1].parent / "shared" / "data")
    if missing is not None:
        (pytest.fail if required else pytest.skip)(missing)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tied_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose LM head is tied to its embeddings."""
    return save_tiny(tmp_path_factory.mktemp("tied"), "llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    """A small local text file, so that tiny-model runs need no shared data."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    words = ("the model compresses layers of weights into factors while the data flows through "
             "every decoder block and the statistics accumulate in float64 ").split()
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (6000,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in picks))
    return path


@pytest.fixture
def no_report(monkeypatch):
    """Runs whose report.md (matplotlib plots, most of a tiny run's time) is not under test skip it."""
    import lrcompress.runner

    monkeypatch.setattr(lrcompress.runner, "write_report", lambda *args, **kwargs: None)
