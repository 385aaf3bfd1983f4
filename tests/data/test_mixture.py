"""Calibration mixtures: every source windowed from its own text with its own seed, in the listed order;
the one-source form unchanged; the web-text files as the known name ``webtext``."""
import json
from pathlib import Path

import pytest
import torch

from helpers import byte_tokenizer
from lrcompress.data import calibration_windows, tokenize, windows_fingerprint
from lrcompress.data.mixture import calibration_set, source_seed
from lrcompress.data.sources import DatasetRef, check_source, load_text
from lrcompress.errors import LrcompressError, RecipeError
from lrcompress.recipe import parse_recipe


def spec(calibration: dict):
    return parse_recipe({"model": {"path": "x"}, "calibration": calibration}).calibration


@pytest.fixture
def two_files(tmp_path) -> tuple[Path, Path]:
    """Two texts with disjoint alphabets, so every window shows which source it came from."""
    letters = tmp_path / "letters.txt"
    letters.write_text("".join(chr(ord("a") + (i * 7) % 26) for i in range(3000)))
    records = tmp_path / "digits.jsonl"
    records.write_text("\n".join(json.dumps({"id": i, "body": "".join(str((i + j) % 10) for j in range(400))})
                                 for i in range(5)) + "\n")
    return letters, records


def test_source_seeds_keep_the_first_and_spread_the_others():
    assert source_seed(7, 0) == 7
    assert len({source_seed(7, i) for i in range(50)}) == 50
    assert all(0 <= source_seed(-3, i) < 2**64 for i in range(1, 5))


def test_each_source_draws_its_windows_from_its_own_text(two_files):
    letters, digits = two_files
    tokenizer = byte_tokenizer()
    cal = spec({"seq_len": 32, "seed": 3, "sources": [{"dataset": str(letters), "num_samples": 5},
                                                      {"dataset": str(digits), "text_column": "body",
                                                       "num_samples": 3}]})
    drawn = calibration_set(cal, tokenizer, None)
    assert drawn.windows.shape == (8, 32) and cal.num_samples == 8
    texts = [tokenizer.decode(w) for w in drawn.windows]
    assert all(t.isalpha() for t in texts[:5])                       # listed order: letters first
    assert all(set(t) <= set("0123456789\n") for t in texts[5:])
    assert [p.num_samples for p in drawn.parts] == [5, 3]
    assert drawn.parts[0].tokens == 3000 and "column body" in drawn.parts[1].description
    assert drawn.parts[1].windows_sha256 == windows_fingerprint(drawn.windows[5:])
    assert drawn.source.description.startswith("mixture: 5 × ") and len(drawn.source.fingerprint) == 16


def test_the_first_source_draws_what_the_one_source_form_draws(two_files):
    letters, digits = two_files
    tokenizer = byte_tokenizer()
    single = calibration_set(spec({"dataset": str(letters), "num_samples": 5, "seq_len": 32, "seed": 3}),
                             tokenizer, None)
    ids = tokenize(tokenizer, letters.read_text())
    assert torch.equal(single.windows, calibration_windows(ids, 5, 32, 3))      # the pre-mixture windows
    mixed = calibration_set(spec({"seq_len": 32, "seed": 3, "sources": [{"dataset": str(letters), "num_samples": 5}]}),
                            tokenizer, None)
    assert torch.equal(mixed.windows, single.windows)


def test_adding_a_source_does_not_reshuffle_the_others(two_files):
    letters, digits = two_files
    tokenizer = byte_tokenizer()
    first = [{"dataset": str(digits), "text_column": "body", "num_samples": 4}]
    one = calibration_set(spec({"seq_len": 16, "sources": first}), tokenizer, None)
    two = calibration_set(spec({"seq_len": 16, "sources": first + [{"dataset": str(letters), "num_samples": 2}]}),
                          tokenizer, None)
    assert torch.equal(two.windows[:4], one.windows)
    three = calibration_set(spec({"seq_len": 16, "sources": first + [{"dataset": str(letters), "num_samples": 2},
                                                                     {"dataset": str(letters), "num_samples": 2}]}),
                            tokenizer, None)
    assert torch.equal(three.windows[:6], two.windows)
    assert not torch.equal(three.windows[4:6], three.windows[6:])   # same text, another seed


def test_a_short_or_missing_source_is_named(two_files, tmp_path):
    letters, _ = two_files
    short = tmp_path / "short.txt"
    short.write_text("too short")
    cal = spec({"seq_len": 32, "sources": [{"dataset": str(letters), "num_samples": 1},
                                           {"dataset": str(short), "num_samples": 1}]})
    with pytest.raises(LrcompressError, match=r"calibration\.sources\.1 \(.*short\.txt/validation\): .*9 tokens"):
        calibration_set(cal, byte_tokenizer(), None)


@pytest.mark.parametrize("calibration, message", [
    ({"dataset": "wikitext2", "sources": [{"dataset": "a.txt", "num_samples": 1}]}, "calibration.dataset is given"),
    ({"split": "test", "sources": [{"dataset": "a.txt", "num_samples": 1}]}, "calibration.split is given"),
    ({"chat_template": True, "sources": [{"dataset": "a.txt", "num_samples": 1}]}, "calibration.chat_template"),
    ({"num_samples": 5, "sources": [{"dataset": "a.txt", "num_samples": 2}]}, "sum to 2"),
    ({"sources": []}, "calibration.sources: List should have at least 1"),
    ({"sources": [{"dataset": "a.txt"}]}, r"calibration\.sources\.0\.num_samples: Field required"),
    ({"sources": [{"dataset": "a.txt", "num_samples": 1, "seq_len": 8}]}, r"calibration\.sources\.0\.seq_len: unknown"),
])
def test_malformed_mixtures_name_the_key(calibration, message):
    with pytest.raises(RecipeError, match=message):
        spec(calibration)


def test_a_mixture_dumps_and_parses_back_and_the_one_source_dump_is_unchanged():
    single = parse_recipe({"model": {"path": "x"}}).model_dump()["calibration"]
    assert single == {"dataset": "wikitext2", "config": None, "split": "validation", "text_column": "text",
                      "chat_template": False, "num_samples": 32, "seq_len": 512, "seed": 0}
    recipe = parse_recipe({"model": {"path": "x"}, "calibration": {"sources": [
        {"dataset": "wikitext2", "num_samples": 3}, {"dataset": "webtext", "split": "calibration", "num_samples": 2}]}})
    dumped = recipe.model_dump()
    assert set(dumped["calibration"]) == {"num_samples", "seq_len", "seed", "sources"}
    assert dumped["calibration"]["num_samples"] == 5
    assert parse_recipe(dumped) == recipe


# ------------------------------------------------------------------ the real files

def test_webtext_is_a_known_name_for_the_two_files(data_dir):
    calibration = check_source(DatasetRef("webtext", "calibration"), data_dir)
    assert calibration == str((data_dir / "webtext" / "webtext.calibration.jsonl").resolve())
    assert check_source(DatasetRef("webtext", "validation"), data_dir) == calibration
    assert check_source(DatasetRef("webtext", "test"), data_dir).endswith("webtext.test.jsonl")
    text = load_text("webtext", "test", data_dir)
    first = json.loads((data_dir / "webtext" / "webtext.test.jsonl").read_text().splitlines()[0])["text"]
    assert text.text.startswith(first + "\n\n") and "column text" in text.description


def test_webtext_without_its_files_says_there_is_no_hub_copy(tmp_path):
    with pytest.raises(LrcompressError, match="no copy on the hub"):
        check_source(DatasetRef("webtext", "test"), tmp_path)
    with pytest.raises(LrcompressError, match="has no split 'train'"):
        check_source(DatasetRef("webtext", "train"), tmp_path)


def test_a_real_two_source_mixture_with_the_smollm2_tokenizer(data_dir):
    """WikiText-2 validation and the web-text calibration file, 4 windows each, SmolLM2's tokenizer:
    every window is a substring of its own source's text and of no other."""
    from transformers import AutoTokenizer

    from helpers import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    cal = spec({"seq_len": 64, "seed": 0, "sources": [
        {"dataset": "wikitext2", "split": "validation", "num_samples": 4},
        {"dataset": str(data_dir / "webtext" / "webtext.calibration.jsonl"), "text_column": "text", "num_samples": 4}]})
    drawn = calibration_set(cal, tokenizer, data_dir)
    wiki = tokenize(tokenizer, load_text("wikitext2", "validation", data_dir).text)
    web = tokenize(tokenizer, load_text(str(data_dir / "webtext" / "webtext.calibration.jsonl"), "validation",
                                        data_dir).text)
    assert [p.tokens for p in drawn.parts] == [wiki.numel(), web.numel()]
    assert drawn.windows.shape == (8, 64)
    for number, window in enumerate(drawn.windows):
        own, other = (wiki, web) if number < 4 else (web, wiki)
        assert _contains(own, window) and not _contains(other, window)
    assert torch.equal(drawn.windows[:4], calibration_windows(wiki, 4, 64, 0))
    assert torch.equal(drawn.windows[4:], calibration_windows(web, 4, 64, source_seed(0, 1)))


def _contains(ids: torch.Tensor, window: torch.Tensor) -> bool:
    """``window`` occurs in ``ids`` (token ids, anywhere)."""
    starts = (ids[: ids.numel() - window.numel() + 1] == window[0]).nonzero().flatten()
    return any(torch.equal(ids[s : s + window.numel()], window) for s in starts.tolist())
