"""Data-parallel calibration across processes (``torchrun``), behind one narrow interface.

The engine and the pre-passes talk to a ``Collective`` and never branch on whether they run alone:

* ``shard(windows)``: the contiguous slice of the calibration windows this process runs (every
  process tokenizes the same windows, so each one knows the global order);
* ``reduce_statistics(stats)``: at a layer boundary, every process's partial statistics are gathered
  (as tensors) and merged with their own ``merge()`` in rank order, on every process, so that all of
  them hold bitwise identical statistics;
* ``run_jobs(jobs)``: the decompositions of a layer are spread over the processes (largest first, to
  the least-loaded process), each owner runs its own, and the results reach every process as bytes
  (``transfer``), so that every process swaps in the very same replacement modules.

``Collective`` itself is the single-process implementation (every call is the identity); the
``TorchCollective`` subclass uses ``torch.distributed``: gloo on CPU, NCCL on CUDA with the device
``cuda:LOCAL_RANK``. ``process_group`` picks one from the environment torchrun sets.

Everything moves as tensors (uint8 tensors of safetensors bytes): no ``all_gather_object`` or
``broadcast_object_list``, which unpickle what they receive.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ..compressor import CompressResult, Statistic
from ..errors import LrcompressError
from .transfer import JobFailure, JobOutcome, decode_outcomes, decode_state, encode_outcomes, encode_state

# A barrier waits while rank 0 writes and evaluates the model, which can take long on a large model.
TIMEOUT = timedelta(hours=6)


@dataclass
class CompressJob:
    """One ``compress_group`` call: its cost (for balancing) and the call itself."""

    cost: int
    run: Callable[[], list[CompressResult]]


def assign_jobs(costs: Sequence[int], world_size: int) -> list[int]:
    """The owner rank of each job: largest cost first, each to the least-loaded rank (lowest on ties).

    Deterministic (ties between equal costs keep the job order), so every process computes the same
    assignment without talking to the others."""
    loads = [0] * world_size
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


def merge_in_rank_order(template: Statistic, states: Sequence[dict[str, torch.Tensor]]) -> Statistic:
    """One statistic per process rebuilt from its state (a shallow copy of ``template`` loading it),
    then merged in rank order: the same operations in the same order on every process."""
    parts = []
    for state in states:
        part = copy.copy(template)
        part.load_state(state)
        parts.append(part)
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    return merged


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous shard; shard sizes differ by at most one window."""
    return rank * count // world_size, (rank + 1) * count // world_size


JobDone = Callable[[int, "JobOutcome"], None]


def _timed(job: CompressJob) -> JobOutcome:
    started = time.perf_counter()
    results = job.run()
    return JobOutcome(results, time.perf_counter() - started)


def run_locally(jobs: Sequence[CompressJob], on_done: JobDone | None = None) -> list[JobOutcome]:
    """Every job here, in order (one process; or work every process does itself); ``on_done(index,
    outcome)`` as each finishes (progress lines per module, not per layer)."""
    outcomes = []
    for index, job in enumerate(jobs):
        outcomes.append(_timed(job))
        if on_done is not None:
            on_done(index, outcomes[-1])
    return outcomes


class Collective:
    """A single process: the whole calibration set, statistics as they are, jobs run in order."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files (checkpoint, metrics, report) and evaluates."""
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """The device this process uses for a configured one (``cuda`` → its own GPU under torchrun)."""
        return device

    def shard(self, windows: torch.Tensor) -> torch.Tensor:
        return windows

    def reduce_statistics(self, stats: Mapping[str, Statistic]) -> dict[str, Statistic]:
        return dict(stats)

    def run_jobs(self, jobs: Sequence[CompressJob], on_done: JobDone | None = None) -> list[JobOutcome]:
        """``on_done(index, outcome)`` as each job finishes (progress lines per module, not per layer)."""
        return run_locally(jobs, on_done)

    def barrier(self) -> None:
        return None

    def close(self) -> None:
        return None


class TorchCollective(Collective):
    """``torch.distributed`` across the processes torchrun started (the group must be initialized)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = device            # where the collectives' buffers live (NCCL needs CUDA tensors)

    def place(self, device: torch.device) -> torch.device:
        return self.device if device.type == "cuda" else device

    def shard(self, windows: torch.Tensor) -> torch.Tensor:
        if len(windows) < self.world_size:
            raise LrcompressError(f"calibration.num_samples ({len(windows)}) is smaller than the number of "
                                  f"processes ({self.world_size}): every process needs at least one window")
        start, stop = shard_bounds(len(windows), self.rank, self.world_size)
        return windows[start:stop]

    def reduce_statistics(self, stats: Mapping[str, Statistic]) -> dict[str, Statistic]:
        """One gather per statistic, so that the transient memory is world size × one statistic."""
        reduced = {}
        for key, statistic in stats.items():
            blobs = self.all_gather_bytes(encode_state(key, statistic.state()))
            reduced[key] = merge_in_rank_order(statistic, [decode_state(key, blob) for blob in blobs])
        return reduced

    def run_jobs(self, jobs: Sequence[CompressJob], on_done: JobDone | None = None) -> list[JobOutcome]:
        owners = assign_jobs([job.cost for job in jobs], self.world_size)
        mine: dict[int, JobOutcome | JobFailure] = {}
        own_error: Exception | None = None
        for index, job in enumerate(jobs):
            if owners[index] != self.rank:
                continue
            try:
                mine[index] = _timed(job)
            except Exception as error:  # every process must learn of it, or the others wait forever
                mine[index] = JobFailure(type(error).__name__, str(error), self.rank)
                own_error = own_error or error
                break
        outcomes: dict[int, JobOutcome | JobFailure] = {}
        for blob in self.all_gather_bytes(encode_outcomes(mine)):
            outcomes.update(decode_outcomes(blob))
        if own_error is not None:
            raise own_error                       # the original exception, with its traceback
        failures = [o for o in outcomes.values() if isinstance(o, JobFailure)]
        if failures:
            raise failures[0].error()
        # Every process, the owner included, continues with what came through the wire.
        ordered = [outcomes[index] for index in range(len(jobs))]
        for index, outcome in enumerate(ordered):
            if on_done is not None:
                on_done(index, outcome)  # type: ignore[arg-type]
        return ordered  # type: ignore[return-value]

    def all_gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every process's ``payload``, in rank order (lengths first, then the bytes padded to the longest)."""
        import torch.distributed as dist

        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        lengths = [int(s.item()) for s in sizes]
        buffer = torch.zeros(max(lengths), dtype=torch.uint8)
        buffer[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        received = [torch.empty(max(lengths), dtype=torch.uint8, device=self.device) for _ in lengths]
        dist.all_gather(received, buffer.to(self.device))
        return [part[:length].cpu().numpy().tobytes() for part, length in zip(received, lengths)]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def open_collective(compute: torch.device) -> Collective:
    """The collective for this process: single-process unless torchrun set WORLD_SIZE > 1, then a
    ``torch.distributed`` group (NCCL on ``cuda:LOCAL_RANK`` when computing on CUDA, else gloo)."""
    world_size = launched_world_size()
    if world_size == 1:
        return Collective()
    import torch.distributed as dist

    if compute.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    return TorchCollective(dist.get_rank(), dist.get_world_size(), device)


@contextlib.contextmanager
def process_group(compute: torch.device) -> Iterator[Collective]:
    """``open_collective`` for the duration of a run; the group is destroyed afterwards."""
    collective = open_collective(compute)
    try:
        yield collective
    finally:
        collective.close()
