"""``lrcompress run --nproc N``: the same command line again, under torchrun, N processes on this machine."""
from __future__ import annotations

import os
import sys
from typing import NoReturn


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


def relaunch_under_torchrun(nproc: int, arguments: list[str]) -> NoReturn:
    """Replace this process by torchrun running the same command (its exit code becomes ours)."""
    command = torchrun_command(nproc, arguments)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
