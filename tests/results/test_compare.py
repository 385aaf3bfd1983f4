"""Run labels of `lrcompress compare`: a budget allocation and output matching make a different recipe."""
import yaml

from lrcompress.results import RunMetrics
from lrcompress.results.compare import method_label


def _run(tmp_path, name, stages, runtime=None):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "recipe.yaml").write_text(yaml.safe_dump({"stages": stages, "runtime": runtime or {}}))
    return directory


def test_labels_name_the_allocation_and_the_target(tmp_path):
    uniform = _run(tmp_path, "a", [{"method": "whiten", "allocation": {"strategy": "uniform"}}], {"target": "layer"})
    budget = _run(tmp_path, "b", [{"method": "whiten", "allocation": {"strategy": "global"}}], {"target": "original"})
    chained = _run(tmp_path, "c", [{"method": "gptq"}, {"method": "eora", "allocation": "spectrum"}])
    assert method_label(RunMetrics(), uniform) == "whiten"
    assert method_label(RunMetrics(), budget) == "whiten[global] (target original)"
    assert method_label(RunMetrics(), chained) == "gptq+eora[spectrum]"


def test_byte_budget_runs_of_one_choice_set_share_a_label_whatever_their_size(tmp_path):
    labels = set()
    for name, mib in (("x", 140), ("y", 160)):
        directory = tmp_path / name
        directory.mkdir()
        budget = {"mib": mib, "choices": [{"method": "gptq", "bits": [3, 4]}, {"method": "whiten", "rank": 8},
                                          {"method": "gptq", "bits": 2}]}
        (directory / "recipe.yaml").write_text(yaml.safe_dump({"stages": [], "budget": budget}))
        labels.add(method_label(RunMetrics(), directory))
    assert labels == {"budget[gptq|whiten]"}


def test_rows_show_every_shared_perplexity_against_dense_and_the_zero_shot_average(tmp_path):
    from lrcompress.results.compare import ZERO_SHOT_COLUMN, RunSummary, common_perplexities, comparison_rows
    from lrcompress.eval.protocol import ZeroShotAverage

    keys = ["wikitext2/test", "webtext/test"]
    protocols = {key: "token-level perplexity, 40 windows" for key in keys}
    run = RunSummary(tmp_path / "lord", "lord", 0.2, 0.2, {"wikitext2/test": 84.78, "webtext/test": 214.9},
                     protocols, {"wikitext2/test": 28.69, "webtext/test": 24.38}, {}, 900, 1000, 0.2,
                     ZeroShotAverage(0.41, 0.0125, 200), ZeroShotAverage(0.52, 0.0121, 200))
    other = RunSummary(tmp_path / "svd", "svd", 0.2, 0.2, {"wikitext2/test": 300.0}, {"wikitext2/test": protocols[
        "wikitext2/test"]}, {}, {}, 900, 1000, 0.2)
    assert common_perplexities([run]) == keys and common_perplexities([run, other]) == ["wikitext2/test"]
    header, rows = comparison_rows([run], keys)
    assert header[6:] == ["perplexity wikitext2/test", "perplexity webtext/test", ZERO_SHOT_COLUMN]
    dense, lord = rows
    assert dense[1] == "dense" and dense[6:] == ["28.690", "24.380", "52.00 ± 1.21"]
    assert lord[6:] == ["84.780 (2.96× dense)", "214.900 (8.81× dense)", "41.00 ± 1.25"]
    header, rows = comparison_rows([run, other], ["wikitext2/test"])
    assert rows[0][1] == "dense" and rows[-1][6:] == ["300.000", "–"]      # no baseline, no average: no ratio


def test_every_shared_perplexity_gets_its_own_plot_and_the_table_both_columns(tmp_path, monkeypatch):
    """The standard evaluation's two domains: a rate–distortion plot each (the first keeps its old name), both
    in compare.md; a perplexity one run lacks gets no plot."""
    from lrcompress.results import compare

    protocols = {"wikitext2/test": "token-level perplexity, 40 windows", "webtext/test": "token-level, 40 windows"}
    dense = {"wikitext2/test": 28.69, "webtext/test": 27.77}
    summaries = {
        "rtn": compare.RunSummary(tmp_path / "rtn", "rtn", 0.0, 0.0, {"wikitext2/test": 38.4, "webtext/test": 36.7},
                                  protocols, dense, {}, 169_166_592, 538_060_032, 0.6),
        "gptq": compare.RunSummary(tmp_path / "gptq", "gptq", 0.0, 0.0, {"wikitext2/test": 87.9, "webtext/test": 90.1},
                                   protocols, dense, {}, 155_895_552, 538_060_032, 0.65),
        "one": compare.RunSummary(tmp_path / "one", "svd", 0.0, 0.0, {"wikitext2/test": 99.0},
                                  {"wikitext2/test": protocols["wikitext2/test"]}, {}, {}, 155_895_552, 538_060_032, 0.6)}
    monkeypatch.setattr(compare, "load_run", lambda directory: summaries[directory.name])
    both = compare.compare_runs([tmp_path / "rtn", tmp_path / "gptq"], tmp_path / "both")
    assert [p.name for p in both.plots] == ["rate_distortion.png", "rate_distortion_webtext-test.png"]
    assert both.plot == both.plots[0] and all(p.read_bytes()[:4] == b"\x89PNG" for p in both.plots)
    table = both.table.read_text()
    assert "perplexity wikitext2/test | perplexity webtext/test" in table
    assert "36.700 (1.32× dense)" in table and "(rate_distortion_webtext-test.png)" in table
    one = compare.compare_runs([tmp_path / "rtn", tmp_path / "one"], tmp_path / "one-domain")
    assert [p.name for p in one.plots] == ["rate_distortion.png"]
    assert not (tmp_path / "one-domain" / "rate_distortion_webtext-test.png").exists()
