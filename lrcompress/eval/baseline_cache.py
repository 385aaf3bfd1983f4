"""The dense baseline's evaluation, cached by a fingerprint of the model and the evaluation settings.

A CI job that gates every pull request against the same dense model should not pay for the dense
evaluation each time. The fingerprint covers the model's files (``models.identity``, the rule a resumed
run's fingerprint uses too), the dtype, the evaluation
settings (perplexity windows, lm-eval tasks/limit/few-shot), the data directory and the lrcompress
version. Entries are JSON files under ``$LRCOMPRESS_CACHE/baselines`` (default ~/.cache/lrcompress).
A cache entry has the ``eval`` section of a metrics.json, so ``lrcompress check --baseline`` reads it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from ..checkpoint.layout import write_atomic
from ..core.cache import cache_root
from ..core.version import __version__
from ..models.identity import model_identity
from .section import BaselineCacheInfo, EvalSection

if TYPE_CHECKING:
    from ..recipe import EvalSpec

log = logging.getLogger(__name__)


def baseline_fingerprint(source: str, dtype: str, settings: dict[str, Any]) -> str:
    payload = {"model": model_identity(source), "dtype": dtype, "settings": settings, "lrcompress": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def eval_settings(spec: "EvalSpec", directory: Path | str | None) -> dict[str, Any]:
    """The evaluation settings that change the numbers (part of the fingerprint)."""
    return {"perplexity": [ppl.model_dump() for ppl in spec.perplexity],
            "lm_eval": spec.lm_eval.model_dump() if spec.lm_eval is not None else None,
            "data_dir": str(Path(directory).resolve()) if directory else None}


def cache_path(fingerprint: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "baselines" / f"{fingerprint}.json"


class BaselineEntry(BaseModel):
    """One cache file; its ``eval`` section is what ``lrcompress check --baseline`` reads."""

    model_config = ConfigDict(extra="forbid")
    fingerprint: str
    model_source: str
    dtype: str
    settings: dict[str, Any]
    eval: EvalSection


def cached_evaluation(source: str, dtype: str, spec: "EvalSpec", directory: Path | str | None,
                      compute: Callable[[], EvalSection], root: Path | None = None
                      ) -> tuple[EvalSection, BaselineCacheInfo]:
    """(the ``eval`` section, where it is cached and whether it was there); ``compute`` runs only on a miss."""
    settings = eval_settings(spec, directory)
    fingerprint = baseline_fingerprint(source, dtype, settings)
    path = cache_path(fingerprint, root)
    if path.is_file():
        try:
            entry = BaselineEntry.model_validate_json(path.read_text())
            log.info("dense baseline from cache %s", path)
            return entry.eval, BaselineCacheInfo(fingerprint=fingerprint, path=str(path), hit=True)
        except ValidationError:
            log.warning("ignoring unreadable baseline cache entry %s", path)
    section = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = BaselineEntry(fingerprint=fingerprint, model_source=source, dtype=dtype,
                          settings=json.loads(json.dumps(settings, default=str)), eval=section)
    write_atomic(path, json.dumps(entry.model_dump(), indent=2, default=str))
    return section, BaselineCacheInfo(fingerprint=fingerprint, path=str(path), hit=False)
