"""What travels between processes, as bytes: statistic states and compression results.

Everything is a safetensors blob (tensors + a JSON string in its metadata), never a pickle: a
receiving process only ever parses JSON and raw tensor bytes.

* A statistic's state (``Statistic.state()``) becomes one blob labelled with its key, so that the
  receiver can check that every process is reducing the same statistic.
* A compression job's results (the replacement modules of one ``compress_group`` call) become one
  blob: the modules' ``spec()`` and record fields (rank, numerical path, details, seconds) in the
  metadata, their state dicts in the tensors. Tensors shared between the modules of a job (a CoSpaDi
  dictionary shared by a group) are stored once and re-tied on arrival, as in the checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from ..checkpoint.reader import restore_aliases
from ..checkpoint.writer import unique_state_dict
from ..compressor import CompressResult
from ..errors import LrcompressError
from ..modules import module_from_spec, module_spec

META = "lrcompress"


@dataclass
class JobOutcome:
    """The results of one compression job and the seconds its owner spent on it."""

    results: list[CompressResult]
    seconds: float


@dataclass
class JobFailure:
    """A job that raised on its owner: every process re-raises it, so that all of them stop together."""

    kind: str
    message: str
    rank: int

    def error(self) -> Exception:
        known = {cls.__name__: cls for cls in _error_classes()}
        text = f"{self.message} (raised on rank {self.rank})"
        return known[self.kind](text) if self.kind in known else RuntimeError(f"{self.kind}: {text}")


def _error_classes() -> list[type[Exception]]:
    """LrcompressError and its subclasses, which keep their type (and CLI handling) across processes."""
    found, pending = [], [LrcompressError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def encode_state(key: str, state: dict[str, torch.Tensor]) -> bytes:
    return save(_cpu(state), metadata={META: json.dumps({"key": key})})


def decode_state(key: str, blob: bytes) -> dict[str, torch.Tensor]:
    """The state in ``blob``; raises if another process sent a different statistic in this slot."""
    sent = json.loads(_metadata(blob)[META])["key"]
    if sent != key:
        raise RuntimeError(f"statistics out of step between processes: expected {key}, received {sent}")
    return load(blob)


def encode_outcomes(outcomes: dict[int, JobOutcome | JobFailure]) -> bytes:
    """The outcomes of the jobs one process ran (job index → outcome or failure) as one blob."""
    container = nn.ModuleDict()
    jobs: dict[str, Any] = {}
    for index, outcome in outcomes.items():
        if isinstance(outcome, JobFailure):
            jobs[str(index)] = {"failure": {"kind": outcome.kind, "message": outcome.message, "rank": outcome.rank}}
            continue
        results = []
        for number, result in enumerate(outcome.results):
            container[f"{index}_{number}"] = result.module
            results.append({"spec": module_spec(result.module), "rank": result.rank,
                            "numerical_path": result.numerical_path, "details": result.details})
        jobs[str(index)] = {"seconds": outcome.seconds, "results": results}
    tensors, aliases = unique_state_dict(container)
    return save(_cpu(tensors), metadata={META: json.dumps({"jobs": jobs, "aliases": aliases})})


def decode_outcomes(blob: bytes) -> dict[int, JobOutcome | JobFailure]:
    """Inverse of :func:`encode_outcomes`: modules rebuilt from their specs, tensors assigned as sent."""
    meta = json.loads(_metadata(blob)[META])
    tensors = load(blob)
    container = nn.ModuleDict()
    for index, job in meta["jobs"].items():
        for number, result in enumerate(job.get("results", [])):
            container[f"{index}_{number}"] = module_from_spec(result["spec"], _dtype_of(tensors, f"{index}_{number}."))
    # assign=True keeps every tensor exactly as sent (dtype included), whatever from_spec allocated.
    missing, unexpected = container.load_state_dict(tensors, strict=False, assign=True)
    if set(missing) - set(meta["aliases"]) or unexpected:
        raise RuntimeError(f"compression results do not match their specs (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    restore_aliases(container, meta["aliases"])
    outcomes: dict[int, JobOutcome | JobFailure] = {}
    for index, job in meta["jobs"].items():
        if "failure" in job:
            outcomes[int(index)] = JobFailure(**job["failure"])
            continue
        results = [CompressResult(container[f"{index}_{number}"], r["rank"], r["numerical_path"], r["details"])
                   for number, r in enumerate(job["results"])]
        outcomes[int(index)] = JobOutcome(results, job["seconds"])
    return outcomes


def _dtype_of(tensors: dict[str, torch.Tensor], prefix: str) -> torch.dtype:
    """The floating dtype the module was built in (its first floating tensor), for ``from_spec``."""
    return next((t.dtype for name, t in tensors.items() if name.startswith(prefix) and t.is_floating_point()),
                torch.float32)


def _metadata(blob: bytes) -> dict[str, str]:
    """The metadata of a safetensors blob (its JSON header), without reading the tensors."""
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + length])
    return header.get("__metadata__", {})
