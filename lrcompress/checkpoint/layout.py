"""The compressed checkpoint's on-disk layout (a Hugging Face-style directory).

    config.json                 the original config + a "quantization_config" block with
                                quant_method "lrcompress" (format, per-module specs, tied aliases)
    model.safetensors           or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    generation_config.json, tokenizer files   copied unchanged from the source model
    recipe.yaml, metrics.json, report.md

Tied tensors (tied embeddings) are stored once; the aliases are listed in the block. The block is a
transformers ``quantization_config`` so that ``import lrcompress`` + ``AutoModelForCausalLM.from_pretrained``
loads the compressed model (``checkpoint/hf_quantizer.py``); ``transformers_weights`` holds
:data:`LOAD_GUARD`, which plain transformers rejects with that sentence (it would otherwise skip the
unknown quantization method and fill every compressed module with random weights). Checkpoints written
before the block moved keep it under the top-level key "lrcompress" and still load with
``lrcompress.load``.
"""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import CheckpointError

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
METADATA_KEY = "lrcompress"
QUANTIZATION_KEY = "quantization_config"
QUANT_METHOD = "lrcompress"
GUARD_KEY = "transformers_weights"
LOAD_GUARD = ("quant_method 'lrcompress': this is an lrcompress checkpoint; `pip install lrcompress` and "
              "`import lrcompress` before from_pretrained (its weights are not model.safetensors)")


def lrcompress_block(config: dict) -> dict | None:
    """The lrcompress block of a config.json's content: its quantization_config, or the top-level
    "lrcompress" block of checkpoints written before format 1 moved it; None if neither."""
    quantization = config.get(QUANTIZATION_KEY)
    if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD:
        return {key: value for key, value in quantization.items() if key != "quant_method"}
    return config.get(METADATA_KEY)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to touch an existing directory unless asked; called before any work starts."""
    if path.exists() and not overwrite:
        raise CheckpointError(f"output directory {path} exists; pass --overwrite (or output.overwrite: "
                              "true) to replace it")


def prepare_output_parent(path: Path) -> None:
    """Create the parent directories of ``path``, or say why they cannot be (a file in the way, a
    read-only filesystem): called before the model is loaded, so a bad output path costs nothing."""
    path = Path(path)
    for ancestor in [path, *path.parents]:
        if ancestor.exists():
            if ancestor != path and not ancestor.is_dir():
                raise CheckpointError(f"output directory {path}: {ancestor} is a file, not a directory; "
                                      "choose another output.dir")
            break
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"output directory {path} is a file; choose another output.dir")
    with disk_errors(f"creating the parent directory of {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)


DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EFBIG: "the file size limit is exceeded", errno.EROFS: "the filesystem is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


@contextmanager
def disk_errors(what: str, resumable: Path | None = None) -> Iterator[None]:
    """Turn a failed write (full disk, quota, read-only filesystem, permissions) into one message that
    says what was being written and, when a staging directory holds the work so far, that rerunning
    the same command resumes from it. safetensors reports I/O failures as its own error type."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as error:
        reason = DISK_ERRNOS.get(error.errno, error.strerror or str(error))
        raise CheckpointError(_disk_message(what, reason + (f" ({error.filename})" if error.filename else ""),
                                            resumable)) from None
    except SafetensorError as error:
        raise CheckpointError(_disk_message(what, str(error), resumable)) from None


def _disk_message(what: str, reason: str, resumable: Path | None) -> str:
    message = f"{what} failed: {reason}."
    if resumable is not None:
        message += f" Free space (or fix the permissions) and rerun the same command: it resumes from {resumable}."
    return message


@contextmanager
def staged_directory(final: Path, overwrite: bool) -> Iterator[Path]:
    """Write into a hidden sibling, then swap it in: a crash never leaves a complete-looking directory."""
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_into_place(staging, final)


def swap_into_place(staging: Path, final: Path) -> None:
    """Rename a finished ``staging`` directory to ``final``, replacing an existing one (the caller
    checked ``overwrite``): the old directory is moved aside first and removed last."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(trash)
        staging.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(final)
    fsync_directory(final.parent)


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def bytes_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(directory))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def fsync_directory(directory: Path) -> None:
    """Make renames inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def replace_durably(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk, rename it over ``path`` and flush the rename: after a crash (kill -9,
    power loss) ``path`` holds either its old content or the new one, never a torn file."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def write_durable(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    replace_durably(tmp, path)
