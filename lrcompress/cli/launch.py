"""``lrcompress run --nproc N``: the same command line again, under torchrun, N processes on this machine."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

from ..errors import LrcompressError

if TYPE_CHECKING:
    from ..recipe import Recipe


def without_nproc(arguments: list[str]) -> list[str]:
    """The command-line arguments with ``--nproc N`` / ``--nproc=N`` removed."""
    kept: list[str] = []
    skip = False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return kept


def torchrun_command(nproc: int, arguments: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m lrcompress ARGS``
    (standalone: a rendezvous on this machine, on a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lrcompress", *without_nproc(arguments)]


def check_launch(recipe: "Recipe", nproc: int) -> None:
    """What would make every process fail alike, checked once before torchrun starts them: each would
    print the same message and torchrun would add its own traceback and exit 1."""
    samples = recipe.calibration.num_samples
    if samples < nproc:
        raise LrcompressError(f"--nproc {nproc}: calibration.num_samples ({samples}) is smaller than the number of "
                              "processes; every process needs at least one window (raise num_samples or lower --nproc)")


def relaunch_under_torchrun(nproc: int, arguments: list[str]) -> NoReturn:
    """Replace this process by torchrun running the same command (its exit code becomes ours)."""
    command = torchrun_command(nproc, arguments)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
