"""The token embedding's grids (issue 27, docs/quantized-embedding.md): which GGUF type the demo model's
source file gave ``token_embd``, and what each ``embedding:`` setting stores and loses on the float table.

    .venv/bin/python bench/embedding_grid.py --model models/smollm2-135m \\
        --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --json runs/embedding_grid.json

For each setting it prints the stored bytes of the ``QuantizedEmbedding`` (codes, float16 scales, zero points),
the relative weight error ‖E − Ê‖_F / ‖E‖_F and the share of values reproduced exactly. Data-free: a few
seconds per setting on one thread.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lrcompress.compressor.embedding import quantize_embedding
from lrcompress.compressor.quantgrid import QuantConfig
from lrcompress.models import adapter_for
from lrcompress.models.loading import load_model
from lrcompress.modules import storage_bytes

SETTINGS = [(8, 128, False), (8, 32, True), (8, 32, False), (6, 32, False), (4, 32, False), (4, 32, True),
            (4, 128, False)]


def gguf_types(path: Path) -> dict[str, object]:
    """The GGUF type of the token embedding and the count of each type over all tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {"token_embd": embedding.tensor_type.name, "token_embd_bytes": int(embedding.n_bytes),
            "has_output_weight": any(t.name == "output.weight" for t in reader.tensors), "types": dict(types)}


def measure(table: torch.Tensor) -> list[dict[str, object]]:
    rows = []
    embedding = nn.Embedding.from_pretrained(table)
    reference = table.to(torch.float64)
    for bits, group, symmetric in SETTINGS:
        started = time.perf_counter()
        quantized = quantize_embedding(embedding, QuantConfig(bits=bits, group_size=group), symmetric)
        approx = quantized.dense_weight()
        error = float(torch.linalg.norm(approx.to(torch.float64) - reference) / torch.linalg.norm(reference))
        rows.append({"bits": bits, "group_size": group, "symmetric": symmetric, "bytes": storage_bytes(quantized),
                     "relative_error": error, "exact_share": float((approx == table).float().mean()),
                     "seconds": time.perf_counter() - started})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--gguf", type=Path, default=None, help="the GGUF file the model was converted from")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model, "float32").model
    table = model.get_submodule(adapter_for(model).embed).weight.detach()
    report = {"model": args.model, "shape": list(table.shape), "float32_bytes": table.numel() * 4,
              "gguf": gguf_types(args.gguf) if args.gguf else None, "settings": measure(table)}
    if report["gguf"]:
        print(f"GGUF {args.gguf.name}: token_embd is {report['gguf']['token_embd']} "
              f"({report['gguf']['token_embd_bytes']:,} bytes); tensor types {report['gguf']['types']}")
    for row in report["settings"]:
        print(f"{row['bits']}-bit g{row['group_size']} {'symmetric' if row['symmetric'] else 'asymmetric'}: "
              f"{row['bytes']:,} bytes ({row['bytes'] / 2**20:.2f} MiB), relative error {row['relative_error']:.3e}, "
              f"exact values {100 * row['exact_share']:.2f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
