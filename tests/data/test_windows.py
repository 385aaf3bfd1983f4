import pytest
import torch

from lrcompress.data import calibration_windows, data_dir, evaluation_windows, load_text
from lrcompress.errors import LrcompressError


def test_calibration_windows_are_seeded_and_drawn_from_the_text():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 5, 32, seed=3)
    assert torch.equal(a, calibration_windows(ids, 5, 32, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 5, 32, seed=4))
    assert a.shape == (5, 32)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 31, dtype=torch.long))  # contiguous slices


def test_evaluation_windows_are_consecutive_and_capped():
    ids = torch.arange(100)
    w = evaluation_windows(ids, 30, None)
    assert w.shape == (3, 30) and torch.equal(w.flatten(), ids[:90])
    assert evaluation_windows(ids, 30, 2).shape == (2, 30)
    with pytest.raises(LrcompressError, match="has 100 tokens, not one window of seq_len 200"):
        evaluation_windows(ids, 200, None)


def test_dataset_names_resolve_under_the_data_dir(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.valid.raw").write_text("valid text")
    monkeypatch.setenv("LRCOMPRESS_DATA", str(tmp_path))
    source = load_text("wikitext2", "validation", data_dir())
    assert source.text == "valid text" and str(tmp_path) in source.description
    assert data_dir("/explicit", "/recipe").as_posix() == "/explicit"
    assert data_dir(None, "/recipe").as_posix() == "/recipe"


def test_missing_local_split_names_the_path_searched(tmp_path):
    with pytest.raises(LrcompressError, match=r"wiki\.test\.raw"):
        load_text("wikitext2", "test", tmp_path)


def test_jsonl_files_join_their_text_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_text(str(path), "train", None).text == "a\n\nb"
