"""``run --nproc N`` re-runs the same command line under torchrun."""
import sys

from lrcompress.cli.launch import torchrun_command, without_nproc


def test_nproc_is_dropped_in_both_spellings():
    assert without_nproc(["--log-json", "run", "r.yaml", "--nproc", "2", "--overwrite"]) == \
        ["--log-json", "run", "r.yaml", "--overwrite"]
    assert without_nproc(["run", "--nproc=4", "r.yaml"]) == ["run", "r.yaml"]


def test_the_command_is_torchrun_on_the_module():
    command = torchrun_command(3, ["run", "r.yaml", "--nproc", "3"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=3" in command and command[-4:] == ["-m", "lrcompress", "run", "r.yaml"]
