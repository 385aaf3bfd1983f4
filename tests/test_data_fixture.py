"""The shared-data fixture: a missing data directory skips only where nothing requires it (make test-fast);
under CI or ``make test`` (LRCOMPRESS_REQUIRE_DATA) it fails and names the missing file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DATA_MARKER, data_required, missing_data

ROOT = Path(__file__).resolve().parents[1]


def _data(root: Path) -> Path:
    (root / DATA_MARKER).parent.mkdir(parents=True)
    (root / DATA_MARKER).write_text("text")
    return root


@pytest.mark.parametrize("environ, required", [
    ({}, False), ({"CI": ""}, False), ({"CI": "false"}, False), ({"LRCOMPRESS_REQUIRE_DATA": "0"}, False),
    ({"CI": "true"}, True), ({"CI": "1"}, True), ({"LRCOMPRESS_REQUIRE_DATA": "1"}, True),
    ({"CI": "false", "LRCOMPRESS_REQUIRE_DATA": "1"}, True),
])
def test_data_is_required_under_ci_or_make_test(environ, required):
    assert (data_required(environ) is not None) == required


def test_present_data_is_found_from_the_environment_or_the_default(tmp_path):
    data = _data(tmp_path / "data")
    assert missing_data({"LRCOMPRESS_DATA": str(data), "CI": "true"}, tmp_path / "elsewhere") == (data, None, False)
    assert missing_data({"CI": "true"}, data) == (data, None, False)


def test_missing_data_names_the_missing_file_and_whether_it_fails(tmp_path):
    path, message, required = missing_data({"LRCOMPRESS_DATA": str(tmp_path)}, tmp_path / "default")
    assert path == tmp_path and not required and str(tmp_path / DATA_MARKER) in message
    path, message, required = missing_data({"CI": "true"}, tmp_path / "default")
    assert path == tmp_path / "default" and required
    assert str(tmp_path / "default" / DATA_MARKER) in message and "CI is set" in message


@pytest.mark.parametrize("environ, outcome", [({"CI": "true"}, "1 error"), ({"CI": ""}, "1 skipped")])
def test_the_fixture_fails_a_real_data_test_under_ci_and_skips_it_otherwise(tmp_path, environ, outcome):
    """The fixture itself, in a pytest run of its own (this conftest, a one-test file) with no data."""
    test = tmp_path / "test_needs_data.py"
    test.write_text("def test_reads(data_dir):\n    assert data_dir\n")
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "HOME": str(tmp_path),
           "LRCOMPRESS_DATA": str(tmp_path / "no-data"), "OMP_NUM_THREADS": "1", **environ}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(test)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in run.stdout, run.stdout + run.stderr
    assert str(tmp_path / "no-data" / DATA_MARKER) in run.stdout
