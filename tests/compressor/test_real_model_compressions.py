"""rtn/gptq/prune/eora on real SmolLM2-135M weights and activations (module level, cheap).

The orderings the papers claim, per module, in the layer-wise output error on real calibration
inputs: GPTQ < RTN at 3 bits, Wanda < magnitude at 2:4, and EoRA < plain residual SVD < no
compensation on top of each base. Perplexity-level numbers are in bench/eora.py.
"""

import pytest
import torch

from lrcompress.compressor import GramStatistic, OriginalWeight, get_compressor
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.data import load_text, tokenize
from lrcompress.models import load_model
from lrcompress.modules import dense_weight
from helpers import smollm2_path

pytestmark = pytest.mark.real_model
MODULES = ["model.layers.3.self_attn.o_proj", "model.layers.3.mlp.down_proj"]  # 576×576, 576×1536


@pytest.fixture(scope="module")
def real(data_dir):
    path = smollm2_path()
    loaded = load_model(str(path))
    model = loaded.model
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "validation", data_dir).text)[: 4 * 512].view(4, 512)
    grams = {n: GramStatistic(model.get_submodule(n).in_features) for n in MODULES}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: grams[n].observe(a[0], o))
             for n in MODULES]
    with torch.no_grad():
        model.model.layers = model.model.layers[:4]  # activations of layer 3 need only layers 0-3
        model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return model, grams


def _compress(method, module, stats, **options):
    cls = get_compressor(method)
    return cls(cls.Config(**options)).compress("m", module, stats).module


@pytest.mark.parametrize("name", MODULES)
def test_paper_orderings_hold_on_real_modules(real, name):
    model, grams = real
    linear, gram = model.get_submodule(name), grams[name]
    w, g = linear.weight.detach(), gram.gram(name)

    def error(module):
        return relative_output_error(w, dense_weight(module), g)

    stats = {"gram": gram, "original_weight": OriginalWeight(w)}
    rtn = _compress("rtn", linear, stats, bits=3, group_size=128)
    gptq = _compress("gptq", linear, stats, bits=3, group_size=128)
    assert error(gptq) < 0.9 * error(rtn)
    wanda = _compress("prune", linear, stats, scoring="wanda", pattern="2:4")
    magnitude = _compress("prune", linear, stats, scoring="magnitude", pattern="2:4")
    assert error(wanda) < error(magnitude)
    for base in (rtn, gptq, wanda):
        plain = _compress("eora", base, stats, rank=32, space="weight")
        eora = _compress("eora", base, stats, rank=32)
        assert error(eora) < error(plain) < error(base)
