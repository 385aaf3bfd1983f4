"""Save, reload, export: the reloaded model computes what the in-memory compressed model computes."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lrcompress
from lrcompress.checkpoint import export_dense, read_metadata
from lrcompress.errors import CheckpointError
from lrcompress.models import load_model
from lrcompress.modules import LowRankLinear
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe

IDS = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def compressed(tied_dir, calibration_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    return run_recipe(tiny_recipe(tied_dir, calibration_file, out, method="lord", ratio=0.3))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_reload_gives_the_same_logits_and_keeps_ties(compressed):
    reloaded = lrcompress.load(compressed.output_dir)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, LowRankLinear)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert (_logits(reloaded) - _logits(compressed.model)).abs().max().item() <= 1e-4


def test_tied_tensors_are_stored_once(compressed):
    _, meta = read_metadata(compressed.output_dir)
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert len(meta["modules"]) == 14 and meta["modules"]["model.layers.0.mlp.up_proj"]["kind"] == "low_rank"


def test_files_shrink_with_the_ratio(tied_dir, calibration_file, tmp_path):
    sizes = []
    for ratio in (0.2, 0.5):
        out = tmp_path / f"r{ratio}"
        sizes.append(run_recipe(tiny_recipe(tied_dir, calibration_file, out, ratio=ratio)).metrics.dump()["compression"]["bytes"])
    dense = sum(p.stat().st_size for p in tied_dir.glob("*.safetensors"))
    assert sizes[1] < sizes[0] < dense


def test_dense_export_loads_with_plain_transformers(compressed, tmp_path):
    loaded = load_model(str(compressed.output_dir))
    export_dense(loaded.model, loaded.tokenizer, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert "lrcompress" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert (_logits(plain) - _logits(compressed.model)).abs().max().item() <= 1e-4


def test_incomplete_checkpoints_are_refused(compressed, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((compressed.output_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no .safetensors"):
        lrcompress.load(broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        lrcompress.load(broken)
