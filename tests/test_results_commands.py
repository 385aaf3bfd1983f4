"""scripts/check_results_commands.py: every command in bench/RESULTS.md and bench/history/ runs from the root."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


checker = load_script(ROOT / "scripts" / "check_results_commands.py", "check_results_commands")


def problems_of(tmp_path: Path, block: str) -> list[str]:
    page = tmp_path / "page.md"
    page.write_text(f"# page\n\n```\n{block}\n```\n")
    count, problems = checker.check_files([page])
    assert count >= 1
    return problems


def test_the_repository_commands_pass():
    files = checker.default_files()
    assert len(files) > 1, "RESULTS.md and the history files"
    count, problems = checker.check_files(files)
    assert problems == []
    assert count > 80


def test_cd_bench_is_flagged(tmp_path):
    problems = problems_of(tmp_path, "cd bench && LRCOMPRESS_DATA=$DATA .venv/bin/python cospadi_speed.py "
                                     "--model models/smollm2-135m")
    assert any("'cd'" in p for p in problems)
    assert any("'cospadi_speed.py' is not a file" in p for p in problems)


@pytest.mark.parametrize("block, message", [
    (".venv/bin/python bench/quality.py --methods whiten --no-such-flag 3", "unrecognized arguments: --no-such-flag"),
    (".venv/bin/python bench/cospadi.py --iterations four", "invalid int value"),
    ("python bench/quality.py --threads 1", "bare 'python'"),
    (".venv/bin/lrcompress run recipes/whiten.yaml --no-such-option", "No such option"),
    (".venv/bin/python -m lrcompress run recipes/whiten.yaml --set stages.0.ratoi=0.2", "ratoi"),
    ("LRCOMPRESS_DATA=$DATA .venv/bin/python bench/build_moe_fixture.py --train-data $LRCOMPRESS_DATA/x.jsonl",
     "$LRCOMPRESS_DATA is read on the line that sets it"),
])
def test_one_problem_is_flagged(tmp_path, block, message):
    problems = problems_of(tmp_path, block)
    assert len(problems) == 1 and message in problems[0], problems


def test_the_same_commands_written_well_pass(tmp_path):
    assert problems_of(tmp_path, "LRCOMPRESS_DATA=$DATA .venv/bin/python bench/cospadi_speed.py "
                                 "--model models/smollm2-135m --configs whiten,cospadi:4 --ratios 0.2") == []
    assert problems_of(tmp_path, ".venv/bin/python -m lrcompress run recipes/whiten.yaml "
                                 "--set stages.0.ratio=0.2 --set runtime.target=original --output runs/x") == []


@pytest.mark.parametrize("block, expected", [
    (".venv/bin/python -m lrcompress bench-infer runs/never --threads 1", 1),
    (".venv/bin/lrcompress run recipes/whiten.yaml --output runs/made\n"
     ".venv/bin/python -m lrcompress bench-infer runs/made --threads 1", 0),
    (".venv/bin/python -m lrcompress bench-infer runs/never --threads 1   # needs: runs/never (made elsewhere)", 0),
])
def test_scratch_outputs_must_be_made_earlier_or_annotated(tmp_path, block, expected):
    problems = problems_of(tmp_path, block)
    assert len(problems) == expected, problems


def test_placeholders_need_a_note(tmp_path):
    problems = problems_of(tmp_path, "PYTHONPATH=<tree> .venv/bin/python bench/decode_layouts.py cold")
    assert any("placeholder <tree>" in p for p in problems)


def test_yaml_blocks_are_not_commands(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```yaml\nmodel: {path: models/smollm2-135m}\n```\n")
    assert checker.check_files([page]) == (0, [])
