"""Reading untrusted checkpoints stays safe: nothing in the package can execute code from a file
(no pickle, no torch.load without weights_only=True, no eval/exec, no object collectives, no remote code
unless asked), and a checkpoint that asks for remote code is refused unless the recipe allows it.

The scan parses the package's source (comments and strings do not count) and is itself tested on a
snippet that breaks every rule, so it cannot pass by finding nothing.
"""
import ast
import json
import shutil
from pathlib import Path

import pytest

from lrcompress.errors import LrcompressError
from lrcompress.models.loading import load_model

PACKAGE = Path(__file__).resolve().parents[1] / "lrcompress"
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "__import__", "compile"}
OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "recv_object_list", "send_object_list"}       # torch.distributed: they unpickle


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(source: str, name: str = "<source>") -> list[str]:
    """Every construct in ``source`` that may run code from data, as "name:line: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
                found.append(f"{where}: {func.id}()")
            if isinstance(func, ast.Attribute) and func.attr in OBJECT_COLLECTIVES:
                found.append(f"{where}: {func.attr}()")
            if (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                    and func.value.id == "torch" and not _is_true(keywords.get("weights_only"))):
                found.append(f"{where}: torch.load without weights_only=True")
            if _is_true(keywords.get("trust_remote_code")):
                found.append(f"{where}: trust_remote_code=True")
    return found


def test_the_scan_finds_every_kind_of_unsafe_code():
    snippet = "\n".join([
        "import pickle", "from dill import loads", "import torch", "torch.load('x.pt')",
        "torch.load('y.pt', weights_only=True)", "eval('1')", "exec('x = 1')",
        "torch.distributed.broadcast_object_list([None])",
        "AutoModel.from_pretrained('m', trust_remote_code=True)", "model.eval()  # a method: fine",
        "'''pickle and eval( in a string are fine'''",
    ])
    found = unsafe_uses(snippet)
    assert len(found) == 7, found
    assert not any(":5:" in line or ":10:" in line or ":11:" in line for line in found)


def test_the_package_never_runs_code_from_data():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    found = [line for path in files for line in unsafe_uses(path.read_text(), str(path.relative_to(PACKAGE)))]
    assert not found, found


def test_remote_code_stays_off_unless_asked(tiny_llama_dir, tmp_path, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_llama_dir))
    assert seen == [False]

    remote = tmp_path / "remote"           # a checkpoint whose architecture exists only as code it ships
    shutil.copytree(tiny_llama_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="shady", auto_map={"AutoModelForCausalLM": "modeling_shady.ShadyForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_shady.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(LrcompressError, match="model_type 'shady' is not an architecture.*trust_remote_code"):
        load_model(str(remote))
