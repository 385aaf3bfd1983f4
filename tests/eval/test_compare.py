"""``compare`` on hand-written run directories: bytes on disk as the size axis, the frontier, the labels."""
import json

import pytest
import yaml

from lrcompress.errors import LrcompressError
from lrcompress.eval.compare import compare_runs

PROTOCOL = "token-level perplexity, wikitext2 test, 4 windows of 64"


def _run(root, name, stages, ppl, size, ratio=0.0, target="layer", dense=None):
    directory = root / name
    directory.mkdir()
    evaluation = {"perplexity": {"wikitext2/test": {"value": ppl, "protocol": PROTOCOL}}}
    if dense is not None:
        evaluation["baseline_perplexity"] = {"wikitext2/test": {"value": dense, "protocol": PROTOCOL}}
    metrics = {"compression": {"model_ratio": ratio, "targeted_ratio": ratio, "bytes": size,
                               "dense_bytes": 1000 * 2**20}, "eval": evaluation}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "recipe.yaml").write_text(yaml.safe_dump({"stages": stages, "runtime": {"target": target}}))
    return directory


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    return [
        _run(root, "gptq4", [{"method": "gptq", "bits": 4, "targets": ["*"]}], 32.0, 200 * 2**20, dense=28.0),
        _run(root, "gptq3", [{"method": "gptq", "bits": 3}], 90.0, 150 * 2**20),
        _run(root, "gptq3-eora", [{"method": "gptq", "bits": 3}, {"method": "eora", "rank": 16}], 55.0, 170 * 2**20),
        _run(root, "whiten", [{"method": "whiten", "ratio": 0.2}], 85.0, 800 * 2**20, ratio=0.2),
        _run(root, "whiten-om", [{"method": "whiten", "ratio": 0.2}], 70.0, 800 * 2**20, ratio=0.2, target="original"),
    ]


def test_bytes_on_disk_is_the_default_axis_and_the_frontier_is_marked(runs, tmp_path):
    header, rows, table, plot = compare_runs(runs, tmp_path / "out")
    assert "MiB on disk" in header and header[-2:] == ["frontier", "stages"]
    by_run = {row[0].rsplit("/", 1)[-1]: row for row in rows}
    frontier = {name for name, row in by_run.items() if row[-2] == "★"}
    # whiten at 800 MiB is beaten by gptq4 at 200 MiB; gptq3+eora is smaller than gptq4 and better than gptq3
    assert frontier == {"gptq4", "gptq3", "gptq3-eora"}
    assert by_run["gptq3-eora"][1] == "gptq+eora" and by_run["gptq3-eora"][-1] == "gptq bits=3 → eora rank=16"
    assert by_run["whiten-om"][1] == "whiten [target original]" and by_run["gptq4"][4] == "200.0"
    text = table.read_text()
    assert "Dense model: perplexity 28.000, 1000.0 MiB of parameters" in text and "size = bytes on disk" in text
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_ratio_axis_and_runs_without_a_checkpoint(runs, tmp_path):
    header, rows, _, _ = compare_runs(runs, tmp_path / "out", x="ratio")
    frontier = {row[0].rsplit("/", 1)[-1] for row in rows if row[-2] == "★"}
    assert frontier == {"whiten-om"}    # by parameters kept, quantization removes nothing: dense beats gptq4
    unsaved = _run(tmp_path, "unsaved", [{"method": "svd", "rank": 2}], 100.0, None)
    _, rows, _, _ = compare_runs([unsaved, runs[0]], tmp_path / "out2")   # falls back to the ratio axis
    assert rows[0][4] == "–" or rows[1][4] == "–"
    with pytest.raises(LrcompressError, match="no checkpoint bytes"):
        compare_runs([unsaved, runs[0]], tmp_path / "out3", x="bytes")
