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
