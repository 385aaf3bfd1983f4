"""The regression gate: thresholds, protocols, and the exit codes of ``lrcompress check``."""
import json

import pytest
from click.testing import CliRunner

from lrcompress.cli.main import cli
from lrcompress.results.gate import GateConfig, GateInputError, evaluate_gate, gate_from_options, metrics_of, run_gate
from lrcompress.results.metrics import EvalSection

TOKEN = "token-level perplexity, wikitext2 test, 40 non-overlapping windows of 512 tokens"


def document(ppl: float, acc: float, lambada_ppl: float = 20.0, protocol: str = TOKEN, samples: int = 100,
             acc_stderr: float = 0.01, log_stderr: float | None = None) -> dict:
    return {"eval": {
        "perplexity": {"wikitext2/test": {"value": ppl, "protocol": protocol, "log_stderr": log_stderr}},
        "lm_eval": {
            "arc_easy": {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": acc, "acc_norm_stderr": acc_stderr,
                         "samples": samples,
                         "num_fewshot": 0, "protocols": {"acc": "lm-eval acc", "acc_norm": "lm-eval acc_norm"}},
            "lambada_openai": {"perplexity": lambada_ppl, "acc": 0.3, "samples": samples, "num_fewshot": 0,
                               "protocols": {"perplexity": "lm-eval target-word perplexity", "acc": "lm-eval acc"}},
        }}}


def section(document: dict) -> EvalSection:
    return EvalSection.model_validate(document["eval"])


def write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def checks_by_name(candidate, baseline, **gate):
    result = evaluate_gate(metrics_of(section(candidate)), metrics_of(section(baseline)), GateConfig(**gate))
    return result, {c.metric: c for c in result.checks}


def test_relative_perplexity_bound():
    _, checks = checks_by_name(document(10.9, 0.5), document(10.0, 0.5), max_ppl_increase=0.1)
    assert checks["perplexity wikitext2/test"].passed
    _, checks = checks_by_name(document(11.1, 0.5), document(10.0, 0.5), max_ppl_increase=0.1)
    assert not checks["perplexity wikitext2/test"].passed
    assert checks["perplexity wikitext2/test"].baseline == 10.0


def test_accuracy_recovery():
    result, checks = checks_by_name(document(10, 0.48), document(10, 0.5), min_recovery=0.95)
    assert checks["arc_easy acc"].passed and result.passed            # 0.48 / 0.5 = 0.96
    result, checks = checks_by_name(document(10, 0.46, acc_stderr=0.005), document(10, 0.5, acc_stderr=0.005),
                                    min_recovery=0.95)
    assert not checks["arc_easy acc"].passed and not result.passed    # 0.92
    assert "perplexity wikitext2/test" not in checks                   # no perplexity threshold given


def test_protocols_stay_apart():
    """lrcompress's token-level perplexity and lm-eval's target-word perplexity are different metrics."""
    run = metrics_of(section(document(10, 0.5, lambada_ppl=50)))
    assert run["perplexity wikitext2/test"].protocol.startswith("token-level")
    assert run["lambada_openai perplexity"].protocol.startswith("lm-eval target-word perplexity")
    # a baseline measured with another token-level protocol is refused, not compared
    other = document(10, 0.5, protocol=TOKEN.replace("512", "2048"))
    with pytest.raises(GateInputError, match="different protocols"):
        checks_by_name(document(10, 0.5), other, max_ppl_increase=0.1)
    # lm-eval results over a different number of documents are not comparable either
    with pytest.raises(GateInputError, match="different protocols"):
        checks_by_name(document(10, 0.5), document(10, 0.5, samples=50), min_recovery=0.9)


def test_metric_missing_in_run_fails():
    candidate = document(10, 0.5)
    del candidate["eval"]["lm_eval"]["arc_easy"]
    result, checks = checks_by_name(candidate, document(10, 0.5), min_recovery=0.9)
    assert not result.passed and checks["arc_easy acc"].bound == "missing in the run"


def test_absolute_bounds():
    gate = gate_from_options(None, None, None, ["perplexity wikitext2/test<=12", "arc_easy acc>=0.6"])
    result, checks = checks_by_name(document(11, 0.5), document(10, 0.5), **gate.model_dump())
    assert checks["perplexity wikitext2/test"].passed
    assert not checks["arc_easy acc"].passed
    with pytest.raises(GateInputError, match="no such metric"):
        checks_by_name(document(11, 0.5), document(10, 0.5), bounds={"hellaswag acc": {"min": 0.3}})
    with pytest.raises(GateInputError, match="METRIC<=NUMBER"):
        gate_from_options(None, None, None, ["arc_easy acc=0.3"])


def test_no_threshold_is_bad_input():
    with pytest.raises(GateInputError, match="no threshold"):
        checks_by_name(document(10, 0.5), document(10, 0.5))


def test_gate_file_uses_the_flags_names_and_flags_override(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("max_ppl_increase: 0.5\nmin_recovery: 0.9\nconfidence: 0.99\nbounds:\n  arc_easy acc: {min: 0.1}\n")
    gate = gate_from_options(path, 0.05, None, [])
    assert gate.max_ppl_increase == 0.05 and gate.min_recovery == 0.9 and gate.confidence == 0.99
    assert gate.bounds["arc_easy acc"].min == 0.1
    assert gate_from_options(path, None, None, [], confidence=0.9, strict=True).strict


def test_old_gate_keys_work_with_a_deprecation_message(tmp_path, caplog):
    path = tmp_path / "gate.yaml"
    path.write_text("max_perplexity_increase: 0.5\nmin_accuracy_recovery: 0.9\n")
    gate = gate_from_options(path, None, None, [])
    assert gate.max_ppl_increase == 0.5 and gate.min_recovery == 0.9
    assert "'max_perplexity_increase' is deprecated; use 'max_ppl_increase'" in caplog.text


def test_a_near_miss_key_gets_a_did_you_mean(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("max_ppl_increse: 0.5\n")
    with pytest.raises(GateInputError, match=r"max_ppl_increse: unknown key \(did you mean 'max_ppl_increase'\?\)"):
        gate_from_options(path, None, None, [])


def test_a_miss_within_the_noise_is_too_small_to_decide():
    """The issue's case: 20 documents (±0.11) cannot tell 0.45 from a 0.95 recovery of 0.5."""
    run, base = document(10, 0.45, acc_stderr=0.11), document(10, 0.5, acc_stderr=0.11)
    result, checks = checks_by_name(run, base, min_recovery=0.95)
    assert checks["arc_easy acc"].verdict == "too small" and result.passed and result.inconclusive
    assert "z = 0.16 < 1.64" in checks["arc_easy acc"].note
    strict, _ = checks_by_name(run, base, min_recovery=0.95, strict=True)
    assert not strict.passed
    # the same miss with 2000 documents (±0.011) is a regression
    result, checks = checks_by_name(document(10, 0.45, acc_stderr=0.011), document(10, 0.5, acc_stderr=0.011),
                                    min_recovery=0.95)
    assert checks["arc_easy acc"].verdict == "FAIL" and not result.passed


def test_perplexity_noise_is_judged_on_the_log_scale():
    # +15% against a +10% bound: log(11.5/11) = 0.0445; SE of the difference sqrt(2)·0.02 = 0.028: z = 1.57
    result, checks = checks_by_name(document(11.5, 0.5, log_stderr=0.02), document(10.0, 0.5, log_stderr=0.02),
                                    max_ppl_increase=0.1)
    assert checks["perplexity wikitext2/test"].verdict == "too small"
    _, checks = checks_by_name(document(11.5, 0.5, log_stderr=0.01), document(10.0, 0.5, log_stderr=0.01),
                               max_ppl_increase=0.1)
    assert checks["perplexity wikitext2/test"].verdict == "FAIL" and "z = 3.14" in checks["perplexity wikitext2/test"].note
    _, checks = checks_by_name(document(11.5, 0.5), document(10.0, 0.5), max_ppl_increase=0.1)
    assert checks["perplexity wikitext2/test"].note == "no stderr"      # no stderr: the point estimate decides
    with pytest.raises(GateInputError, match="greater than or equal to 0"):
        gate_from_options(None, -0.1, None, [])


def test_embedded_dense_baseline(tmp_path):
    run = document(12, 0.5)
    run["eval"]["baseline_perplexity"] = {"wikitext2/test": {"value": 10.0, "protocol": TOKEN}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(run))
    assert not run_gate(path, None, GateConfig(max_ppl_increase=0.1)).passed
    assert run_gate(path, None, GateConfig(max_ppl_increase=0.25)).passed
    del run["eval"]["baseline_perplexity"]
    path.write_text(json.dumps(run))
    with pytest.raises(GateInputError, match="no --baseline given"):
        run_gate(path, None, GateConfig(max_ppl_increase=0.25))


@pytest.mark.parametrize("candidate, flags, code", [
    (document(10.5, 0.5), ["--max-ppl-increase", "0.1", "--min-recovery", "0.95"], 0),
    (document(10.5, 0.45, acc_stderr=0.11), ["--min-recovery", "0.95"], 0),              # too small to decide
    (document(10.5, 0.45, acc_stderr=0.11), ["--min-recovery", "0.95", "--strict"], 1),
    (document(11.5, 0.5), ["--max-ppl-increase", "0.1", "--min-recovery", "0.95"], 1),
    (document(10.5, 0.4, acc_stderr=0.01), ["--max-ppl-increase", "0.1", "--min-recovery", "0.95"], 1),
    (document(10.5, 0.5), [], 2),                                     # no threshold
    (document(10.5, 0.5, protocol="other"), ["--max-ppl-increase", "0.1"], 2),
])
def test_check_exit_codes(tmp_path, candidate, flags, code):
    run = write(tmp_path / "metrics.json", candidate)
    base = write(tmp_path / "base.json", document(10.0, 0.5))
    result = CliRunner().invoke(cli, ["check", run, "--baseline", base, *flags])
    assert result.exit_code == code, result.output
    if code != 2:
        assert "arc_easy acc" in result.output and "baseline" in result.output
        assert ("REGRESSION" in result.output) == (code == 1)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"modules": []}), json.dumps([1, 2]),
                                     json.dumps({"eval": {"perplexity": {"w": {"value": 3}}}})])
def test_check_malformed_input_exits_2(tmp_path, content):
    (tmp_path / "metrics.json").write_text(content)
    base = write(tmp_path / "base.json", document(10.0, 0.5))
    result = CliRunner().invoke(cli, ["check", str(tmp_path / "metrics.json"), "--baseline", base,
                                      "--max-ppl-increase", "0.1"])
    assert result.exit_code == 2, result.output
    assert "metrics.json" in " ".join(result.output.split())


def test_check_missing_file_exits_2(tmp_path):
    result = CliRunner().invoke(cli, ["check", str(tmp_path / "nope.json"), "--max-ppl-increase", "0.1"])
    assert result.exit_code == 2 and "no such file" in " ".join(result.output.split())
