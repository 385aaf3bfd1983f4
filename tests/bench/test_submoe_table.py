"""bench/submoe_table.py's issue-32 additions: several calibration seeds per row, per-domain held-out
perplexity on a fixture built with --domains, and the table that summarizes them."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))   # bench/submoe_table.py
from helpers import byte_tokenizer, tiny_model
from submoe_table import domain_calibration, fixture_splits, print_table, windows_perplexity


def test_table_gives_the_mean_and_range_over_seeds_and_reads_records_without_a_seed(tmp_path, capsys):
    rows = [{"label": "fixture (no reduction)", "method": None, "kept": 8, "measure": "ppl", "perplexity": 30.0,
             "protocol": "p"},                                               # an issue-15 record: no seed
            *({"label": "prune: frequency", "method": "expert_prune", "kept": 4, "measure": "ppl", "seed": s,
               "perplexity": 33.0 + 3 * s, "block_rel_error": 0.1 * (s + 1), "block_params": 0.5} for s in (0, 1)),
            {"label": "prune: frequency", "method": "expert_prune", "kept": 4, "measure": "domains", "seed": 0,
             "domains": {"code": 3.0, "book": 40.0}}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print_table(path)
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("| prune: frequency"))
    assert "| 2 |" in line and "34.50 (33.00–36.00)" in line and "1.150× (1.100×–1.200×)" in line
    assert "0.1500 (0.1000–0.2000) | – |" in line and "| 40.00 | 3.00 | 10.95 |" in line        # book, code: sorted


def test_windows_perplexity_is_the_models_own_loss():
    model = tiny_model("llama", num_hidden_layers=1)
    ids = torch.randint(3, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = float(torch.exp(model(input_ids=ids, labels=ids).loss))
    assert windows_perplexity(model, ids, batch=2) == pytest.approx(expected, rel=1e-5)


def test_fixture_splits_rebuild_the_builds_split_and_calibration_never_reads_held_out_text(tmp_path, monkeypatch, data_dir):
    from btx_domains import domain_splits

    data = data_dir
    monkeypatch.setenv("LRCOMPRESS_DATA", str(data))
    arguments = {"domains": "code_humaneval,qa_arc", "seq_len": 64, "windows_per_domain": 4, "router_windows": 2,
                 "router_test_windows": 2, "held_out_windows": 3, "seed": 0}
    (tmp_path / "fixture_info.json").write_text(json.dumps({"arguments": arguments}))
    rebuilt = fixture_splits(tmp_path, byte_tokenizer())
    splits = domain_splits(data, ["code_humaneval", "qa_arc"], byte_tokenizer(), 64, 4, 2, 2, 3, 0)
    assert [s.name for s in rebuilt] == ["code_humaneval", "qa_arc"]
    for mine, split in zip(rebuilt, splits):
        assert torch.equal(mine.held_out, split.held_out) and mine.held_out.shape == (3, 64)
        assert torch.equal(mine.train, split.train) and torch.equal(mine.router_fit, split.router_fit)
    calibration = {seed: domain_calibration(rebuilt, 3, seed) for seed in (0, 1)}
    assert calibration[0].shape == (6, 64) and not torch.equal(calibration[0], calibration[1])
    pools = [torch.cat([s.router_fit, s.router_test]) for s in rebuilt]
    for row in calibration[0]:
        assert any((pool == row).all(1).any() for pool in pools)
        assert not any((s.held_out == row).all(1).any() for s in rebuilt)
    (tmp_path / "fixture_info.json").write_text(json.dumps({"arguments": {**arguments, "domains": None}}))
    with pytest.raises(SystemExit, match="not built with --domains"):
        fixture_splits(tmp_path, byte_tokenizer())


def test_held_out_block_error_is_zero_for_the_unreduced_model_and_grows_with_a_change():
    from btx import assemble, mlp_weights
    from submoe_table import block_errors, block_reference

    dense = tiny_model("llama", num_hidden_layers=2)
    experts = {i: [mlp_weights(dense.model.layers[i].mlp)] * 4 for i in (0, 1)}
    routers = {i: torch.randn(4, dense.config.hidden_size, generator=torch.Generator().manual_seed(i)) for i in (0, 1)}
    moe = assemble(dense, experts, routers, top_k=2)
    held = {"a": torch.randint(3, 250, (3, 16)), "b": torch.randint(3, 250, (3, 16))}
    reference = block_reference(moe, held, 2)
    assert {i: x.shape for i, (x, _) in reference.items()} == {0: (4, 16, 64), 1: (4, 16, 64)}
    assert block_errors(moe, reference) == {0: 0.0, 1: 0.0}
    with torch.no_grad():
        moe.model.layers[1].mlp.experts.down_proj[0] *= 1.5
    errors = block_errors(moe, reference)
    assert errors[0] == 0.0 and errors[1] > 0.01


@pytest.mark.parametrize("method, options", [("expert_prune", {}), ("submoe", {}),
                                             ("expert_average", {"expert_groups": [[0, 3], [1, 2]]}),
                                             ("submoe", {"merge": "regmean", "expert_groups": [[0, 3], [1, 2]]})])
def test_reduce_records_which_experts_each_block_kept_or_merged(tmp_path, method, options):
    from btx import assemble, mlp_weights
    from submoe_table import reduce

    dense = tiny_model("llama", num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    experts = {i: [tuple(w + 0.1 * torch.randn(w.shape, generator=g) for w in mlp_weights(dense.model.layers[i].mlp))
                   for _ in range(4)] for i in (0, 1)}
    routers = {i: torch.randn(4, dense.config.hidden_size, generator=g) for i in (0, 1)}
    assemble(dense, experts, routers, top_k=2).save_pretrained(tmp_path)
    model, _, info = reduce(str(tmp_path), method, options, 2, torch.randint(3, 250, (4, 16), generator=g))
    assert set(info["groups"]) == {"0", "1"}
    for groups in info["groups"].values():            # a partition of the 4 experts into 2 groups (pruning: 2 kept)
        members = sorted(i for group in groups for i in group)
        assert len(groups) == 2 and (members == [0, 1, 2, 3] if method != "expert_prune" else len(members) == 2)
        if "expert_groups" in options:                  # the oracle rows: exactly the given groups, in every block
            assert groups == [[0, 3], [1, 2]]
    assert ("routed_tokens" in info) == (options.get("merge") == "regmean")
    assert json.loads(json.dumps(info)) == info
    assert all(layer.mlp.experts.down_proj.shape[0] == 2 for layer in model.model.layers)


def test_paired_difference_is_the_mean_difference_with_the_paired_standard_error():
    from submoe_table import paired_difference

    a, b = [1, 1, 0, 1, 0, 1, 1, 1], [1, 1, 0, 1, 0, 1, 0, 0]       # the same documents; 2 of 8 differ
    mean, se = paired_difference(a, b)
    d = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.float64)
    assert mean == pytest.approx(0.25) and se == pytest.approx(float(d.std() / math.sqrt(8)))
    a = [1] * 60 + [0] * 40                                           # 100 documents, 4 of them differ
    mean, se = paired_difference(a, [0] * 4 + a[4:])
    assert mean == pytest.approx(0.04) and se == pytest.approx(math.sqrt(0.04 * 0.96 / 99))
    assert se < 0.5 * math.sqrt(0.56 * 0.44 / 100)                    # < half either accuracy's own stderr
    with pytest.raises(ValueError, match="same documents"):
        paired_difference(a, b[:-1])


def test_printed_table_pairs_each_row_with_the_fixture_on_the_same_documents(tmp_path, capsys):
    from submoe_table import DENSE_LABEL

    def scored(label, method, kept, acc, seed=0):
        return {"label": label, "method": method, "kept": kept, "seed": seed, "measure": "tasks", "limit": 4,
                "tasks": {"piqa": {"acc": sum(acc) / 4, "acc_stderr": 0.25, "per_document": {"acc": acc}}}}

    records = [scored("fixture (no reduction)", None, 8, [1, 1, 1, 0]), scored(DENSE_LABEL, None, 0, [1, 0, 0, 0]),
               scored("prune: frequency", "expert_prune", 4, [1, 1, 0, 0])]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print_table(path)
    out = capsys.readouterr().out
    assert "| prune: frequency | 4 | 0 | 0.5000 ± 0.2500 | -0.2500 ± 0.2500 |" in out
    assert f"| {DENSE_LABEL} | 0 | 0 | 0.2500 ± 0.2500 | -0.5000 ± 0.2887 |" in out
    assert "| fixture (no reduction) | 8 | 0 | 0.7500 ± 0.2500 | – |" in out


def test_oracle_rows_come_last_and_run_only_with_their_groups_at_their_size():
    import argparse

    from submoe_table import ORACLE, parse_groups, plan_rows, rows

    assert [label for label, _, _ in rows(0.3)][:13] == [label for label, _, _ in rows(0.3, [[0, 1]])][:13]
    assert parse_groups("0,1/2,3/4,5/6,7") == [[0, 1], [2, 3], [4, 5], [6, 7]] and parse_groups("") is None
    with pytest.raises(SystemExit, match="--oracle-groups"):
        parse_groups("0,1/a")

    def plan(**given):
        args = argparse.Namespace(**{"only": "", "oracle_groups": "", "tag": "", "dagger_ratio": 0.3, "dense": None,
                                     **given})
        return [(label, kept, seed, options) for label, _, options, kept, seed in plan_rows(args, 8, [6, 4], [0, 1])]

    assert not any(ORACLE in label for label, *_ in plan())                  # no groups given: not run
    oracle = [row for row in plan(oracle_groups="0,1/2,3/4,5/6,7") if ORACLE in row[0]]
    assert [(label.split(",")[0], kept, seed) for label, kept, seed, _ in oracle] == [
        ("averaging", 4, 0), ("Sub-MoE", 4, 0), ("Sub-MoE + RegMean", 4, 0),
        ("averaging", 4, 1), ("Sub-MoE", 4, 1), ("Sub-MoE + RegMean", 4, 1)]       # only at 4 kept = 4 groups
    assert all(options["expert_groups"] == [[0, 1], [2, 3], [4, 5], [6, 7]] for *_, options in oracle)
    with pytest.raises(SystemExit, match="give --oracle-groups"):
        plan(only="4,15")
    tagged = plan(only="1,7", tag="12 per domain")
    assert [(label, kept) for label, kept, *_ in tagged][:3] == [
        ("fixture (no reduction)", 8), ("Sub-MoE clusters + RegMean [12 per domain]", 6),
        ("Sub-MoE clusters + RegMean [12 per domain]", 4)]                  # the unreduced fixture is not tagged


def test_tagged_rows_are_their_own_table_lines_in_the_rows_order(tmp_path, capsys):
    records = [{"label": label, "method": "submoe", "kept": 4, "measure": "domains", "seed": 0,
                "domains": {"code": value}, "block_rel_error": 0.1}
               for label, value in [("Sub-MoE clusters + RegMean [12 per domain]", 3.0),
                                    ("Sub-MoE clusters + RegMean", 4.0),
                                    ("merge: frequency-weighted average (MC-SMoE-like)", 5.0)]]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print_table(path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "| 4 |" in line]
    assert [line.split(" | ")[0] for line in lines] == [
        "| merge: frequency-weighted average (MC-SMoE-like)", "| Sub-MoE clusters + RegMean",
        "| Sub-MoE clusters + RegMean [12 per domain]"]
