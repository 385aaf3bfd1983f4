"""One writer per output directory: the lock is atomic, names its holder, is released on exit and
taken over from a dead run; two runs started at once into one directory: one runs, one is refused."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lrcompress.checkpoint.lock import OutputLock, lock_path
from lrcompress.errors import CheckpointError
from tiny_runs import tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from pathlib import Path
from lrcompress.checkpoint.lock import OutputLock
OutputLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""
RUN_ON_SIGNAL = """
import sys, time
from pathlib import Path
import lrcompress.cli.main as main
go = Path(sys.argv[1])
while not go.exists():      # both processes start the run at the same moment, imports done
    time.sleep(0.01)
sys.argv = ["lrcompress", "run", sys.argv[2]]
main.main()
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_the_lock_records_its_holder_and_is_released(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        holder = json.loads(lock_path(out).read_text())
        assert holder["pid"] == os.getpid() and holder["hostname"] == socket.gethostname()
        with pytest.raises(CheckpointError, match=rf"being written by another run: pid {os.getpid()} on host "
                                                  rf"{socket.gethostname()}"):
            OutputLock(out).acquire()            # another open file description: flock refuses it
    assert not lock_path(out).exists()
    with OutputLock(out):                        # free again
        pass


def test_a_lock_left_by_a_killed_run_is_taken_over_and_named(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            OutputLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid     # the dead run's file is still there
    said = []
    with OutputLock(out, said.append):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and "stale lock" in said[0] and f"pid {holder.pid}" in said[0]


def test_a_removed_lock_file_is_not_shared(tmp_path):
    """A run that opened the lock file just before its holder released (and unlinked) it must not
    believe it holds a lock on the unlinked file: it locks the new file instead."""
    out = tmp_path / "out"
    first = OutputLock(out)
    first.acquire()
    stale_handle = os.open(lock_path(out), os.O_RDWR)
    first.release()
    second = OutputLock(out)
    second.acquire()
    try:
        assert os.stat(lock_path(out)).st_ino != os.fstat(stale_handle).st_ino
        with pytest.raises(CheckpointError, match="another run"):
            OutputLock(out).acquire()
    finally:
        os.close(stale_handle)
        second.release()


@pytest.mark.usefixtures("no_report")
def test_two_runs_started_at_once_into_one_directory(tiny_llama_dir, calibration_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out")))
    script = tmp_path / "run.py"
    script.write_text(RUN_ON_SIGNAL)
    go = tmp_path / "go"
    runs = [subprocess.Popen([sys.executable, str(script), str(go), str(recipe)], env=env(), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outcomes = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], [err[-1500:] for _, _, err in outcomes]
    refused = next(err for code, _, err in outcomes if code == 2)
    assert "is being written by another run: pid" in " ".join(refused.split())
    assert "Traceback" not in refused
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out", "recipe.yaml", "run.py"]
