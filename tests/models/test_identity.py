"""One model identity for every fingerprint (resume, baseline cache): content, not timestamps."""
import os

import pytest

from lrcompress.errors import LrcompressError
from lrcompress.models.identity import model_identity


def test_identity_follows_the_content_not_the_timestamps(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4096)
    (tmp_path / "README.md").write_text("not part of the model")
    first = model_identity(tmp_path)
    assert set(first) == {"config.json", "model.safetensors"}
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))          # a copy or a touch: same model
    assert model_identity(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4095 + b"\x01")
    assert model_identity(tmp_path) != first
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4096)
    (tmp_path / "config.json").write_text('{"hidden_size": 9}')
    assert model_identity(tmp_path) != first


def test_identity_of_a_file_a_hub_id_and_an_empty_directory(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    assert set(model_identity(gguf)) == {"m.gguf"}
    assert model_identity("org/model") == {"hub_id": "org/model"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(LrcompressError, match="no config.json or weight files"):
        model_identity(tmp_path / "empty")
