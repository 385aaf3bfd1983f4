"""Tiny random models and a byte-level tokenizer, built from configs (no hub, no downloads)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

TINY_DIMS = dict(vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is one token (ids 3..258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(byte_chars))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    dims = {**TINY_DIMS, **overrides}
    config = AutoConfig.for_model(family, **dims)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny(directory: Path, family: str = "llama", max_shard_size: str | None = None, **overrides) -> Path:
    """A random model of the tiny family (dims overridable: also for synthetic checkpoints of any size),
    saved as safetensors (in shards with an index when ``max_shard_size`` is given) with a tokenizer."""
    model = tiny_model(family, **overrides)
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    byte_tokenizer().save_pretrained(directory)
    return directory


def correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly non-isotropic covariance (like real activations), float64."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, features, dtype=torch.float64)
    return torch.randn(rows, features, generator=g, dtype=torch.float64) @ (mixing * scales[:, None])


def observed_linear(rows: int, out_features: int, in_features: int, seed: int = 0, bias: bool = False):
    """A float64 Linear, correlated inputs ``x`` and their Gram statistic: the compressor tests' setting."""
    from torch import nn

    from lrcompress.compressor import GramStatistic

    torch.manual_seed(seed)
    x = correlated_inputs(rows, in_features, seed=seed)
    linear = nn.Linear(in_features, out_features, bias=bias).double()
    gram = GramStatistic(in_features)
    gram.observe(x, linear(x))
    return x, linear, gram


def compress_with(method: str, module, statistics: dict, name: str = "test.module", **options):
    """The module ``method`` (configured by ``options``) returns for ``module``, given its statistics."""
    from lrcompress.compressor import get_compressor

    cls = get_compressor(method)
    return cls(cls.Config(**options)).compress(name, module, statistics).module


DATA_MARKER = Path("wikitext-2-raw") / "wiki.valid.raw"      # a file every real-data test reads
OFF = ("", "0", "false", "no")


def data_required(environ: Mapping[str, str]) -> str | None:
    """Why a missing shared data directory must fail the tests (None: it may skip them). ``make test``
    sets LRCOMPRESS_REQUIRE_DATA=1; CI runners set CI=true; ``make test-fast`` sets neither."""
    if environ.get("LRCOMPRESS_REQUIRE_DATA", "").strip().lower() not in OFF:
        return "LRCOMPRESS_REQUIRE_DATA is set (make test)"
    if environ.get("CI", "").strip().lower() not in OFF:
        return "CI is set"
    return None


def missing_data(environ: Mapping[str, str], default: Path) -> tuple[Path, str | None, bool]:
    """(the data directory, what is missing there or None, whether that must fail): $LRCOMPRESS_DATA,
    else ``default`` (the shared data beside the checkout)."""
    value = environ.get("LRCOMPRESS_DATA")
    path = Path(value) if value else default
    if (path / DATA_MARKER).is_file():
        return path, None, False
    reason = data_required(environ)
    message = f"shared data not found: {path / DATA_MARKER} is missing (set LRCOMPRESS_DATA)"
    return path, (message + (f"; required because {reason}" if reason else "")), reason is not None


def smollm2_path() -> Path:
    """The converted demo model (``make model``); real-model tests fail, not skip, without it."""
    import os

    import pytest

    default = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m"
    path = Path(os.environ.get("LRCOMPRESS_SMOLLM2", default))
    if not (path / "config.json").is_file():
        pytest.fail(f"SmolLM2 not found at {path}: run `make model` (or set LRCOMPRESS_SMOLLM2)")
    return path


def sparse_coded_linear(in_features: int, out_features: int, atoms: int, sparsity: int, seed: int = 0,
                        orthonormal: bool = False):
    """A float64 Linear whose whitened weights Fᵀ·W (paper orientation, G = F·Fᵀ the damped Gram of its
    inputs) are exactly ``sparsity``-sparse codes over ``atoms`` random atoms (orthonormal ones with
    ``orthonormal``): the union-of-subspaces structure dictionary methods assume, which no low-rank
    factorization of the same size captures. Returns the Linear and its Gram statistic."""
    from torch import nn

    from lrcompress.compressor import GramStatistic

    g = torch.Generator().manual_seed(seed)
    x = correlated_inputs(800, in_features, seed=seed)
    gram = x.T @ x
    factor = torch.linalg.cholesky(gram + 1e-4 * gram.diagonal().mean() * torch.eye(in_features, dtype=gram.dtype))
    basis = torch.randn(in_features, in_features if orthonormal else atoms, generator=g, dtype=torch.float64)
    dictionary = torch.linalg.qr(basis)[0][:, :atoms] if orthonormal else basis
    codes = torch.zeros(atoms, out_features, dtype=torch.float64)
    for column in range(out_features):
        support = torch.randperm(atoms, generator=g)[:sparsity]
        codes[support, column] = torch.randn(sparsity, generator=g, dtype=torch.float64)
    weight = torch.linalg.solve_triangular(factor.T, dictionary @ codes, upper=True)      # Fᵀ·W = D·S
    linear = nn.Linear(in_features, out_features, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(weight.T)
    statistic = GramStatistic(in_features)
    statistic.observe(x, linear(x))
    return linear, statistic


def load_script(path: Path, name: str):
    """A script outside the package (scripts/, bench/) imported as a module, for testing its functions."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_runtime_option_refused(directory: Path, option: str, value: str, key: str) -> None:
    """A recipe file whose ``runtime.<option>`` is ``value`` (YAML) is refused on load, the error matching ``key``
    and naming the file (the runtime options' recipe tests share it)."""
    import pytest

    from lrcompress.errors import RecipeError
    from lrcompress.recipe import load_recipe

    path = directory / "recipe.yaml"
    path.write_text(f"model: {{path: m}}\nstages:\n  - {{method: whiten, ratio: 0.2}}\nruntime: {{{option}: {value}}}\n")
    with pytest.raises(RecipeError, match=key) as info:
        load_recipe(path)
    assert str(path) in str(info.value)
