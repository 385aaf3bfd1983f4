"""The dense baseline's evaluation, cached by a fingerprint of the model and the evaluation settings.

A CI job that gates every pull request against the same dense model should not pay for the dense
evaluation each time. The fingerprint covers the model's config and weight files (name, size, and the
sha256 of their first and last MiB: cheap, and changes when the weights do), the dtype, the evaluation
settings (perplexity windows, lm-eval tasks/limit/few-shot), the data directory and the lrcompress
version. Entries are JSON files under ``$LRCOMPRESS_CACHE/baselines`` (default ~/.cache/lrcompress).
A cache entry has the ``eval`` section of a metrics.json, so ``lrcompress check --baseline`` reads it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from ..errors import LrcompressError
from ..models.gguf import cache_root

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
EDGE_BYTES = 1 << 20


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}|{size}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        if size > 2 * EDGE_BYTES:
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


def model_identity(source: str) -> dict[str, Any]:
    """What identifies the model's weights: file digests for a local directory or file, else the hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"file": _file_digest(path)}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
        if not files:
            raise LrcompressError(f"{path}: no config.json or weight files to fingerprint")
        return {p.name: _file_digest(p) for p in files}
    return {"hub_id": source}


def baseline_fingerprint(source: str, dtype: str, settings: dict[str, Any]) -> str:
    from .. import __version__

    payload = {"model": model_identity(source), "dtype": dtype, "settings": settings, "lrcompress": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def eval_settings(perplexity_specs: list, lm_eval_spec, directory: Path | None) -> dict[str, Any]:
    """The evaluation settings that change the numbers (part of the fingerprint)."""
    return {"perplexity": [spec.model_dump() for spec in perplexity_specs],
            "lm_eval": lm_eval_spec.model_dump() if lm_eval_spec is not None else None,
            "data_dir": str(Path(directory).resolve()) if directory else None}


def cache_path(fingerprint: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "baselines" / f"{fingerprint}.json"


def cached_evaluation(source: str, dtype: str, settings: dict[str, Any], compute: Callable[[], dict[str, Any]],
                      root: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``eval`` section, {fingerprint, path, hit}); ``compute`` runs only on a cache miss."""
    from ..checkpoint.layout import write_atomic

    fingerprint = baseline_fingerprint(source, dtype, settings)
    path = cache_path(fingerprint, root)
    if path.is_file():
        try:
            entry = json.loads(path.read_text())
            log.info("dense baseline from cache %s", path)
            return entry["eval"], {"fingerprint": fingerprint, "path": str(path), "hit": True}
        except (json.JSONDecodeError, KeyError):
            log.warning("ignoring unreadable baseline cache entry %s", path)
    section = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"fingerprint": fingerprint, "model_source": source, "dtype": dtype,
                                   "settings": settings, "eval": section}, indent=2, default=str))
    return section, {"fingerprint": fingerprint, "path": str(path), "hit": False}
