"""bench/lambada_probe.py scores LAMBADA's final word as lm-eval's HFLM does (tiny random Llama, byte tokenizer)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))   # bench/lambada_probe.py
from helpers import byte_tokenizer, tiny_model
from lambada_probe import log_probs, passages, score

pytest.importorskip("lm_eval")

DOCS = [{"text": "She opened the door and saw her old friend standing in the rain with her friend"},
        {"text": "The dog ran to fetch the ball  and brought it back to the boy."},
        {"text": "A much longer passage that the window of sixteen tokens must cut from the left, as HFLM cuts it"}]


@pytest.mark.parametrize("max_length", [2048, 16])
def test_the_scorer_agrees_with_lm_evals_loglikelihood(max_length):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model("llama", max_position_embeddings=256), byte_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu", max_length=max_length)
    requests = [Instance("loglikelihood", doc, (" ".join(doc["text"].split(" ")[:-1]), " " + doc["text"].split(" ")[-1]),
                         i) for i, doc in enumerate(DOCS)]
    expected = lm.loglikelihood(requests, disable_tqdm=True)
    items = passages(lm, DOCS)
    got = [score(log_probs(model, p, lm.max_length), p, None) for p in items]
    torch.testing.assert_close(torch.tensor([s.logp for s in got], dtype=torch.float64),
                               torch.tensor([e[0] for e in expected], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert [s.greedy for s in got] == [e[1] for e in expected]
    assert all((s.first_rank == 1) >= s.greedy for s in got)               # greedy implies the first token's rank 1
    assert [p.in_context for p in items] == [True, False, False]          # "friend" occurs earlier; "boy." does not


def test_kl_is_zero_against_itself_and_positive_against_another_model():
    model, other, tokenizer = tiny_model("llama"), tiny_model("llama", seed=1), byte_tokenizer()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    item = passages(lm, DOCS[:1])[0]
    dense = log_probs(model, item, lm.max_length)
    same, different = score(dense, item, dense), score(log_probs(other, item, lm.max_length), item, dense)
    assert same.kl_target == pytest.approx(0.0, abs=1e-12) and same.kl_passage == pytest.approx(0.0, abs=1e-12)
    assert different.kl_target > 0 and different.kl_passage > 0


def test_the_entropy_is_log_v_for_a_uniform_model_and_lower_for_a_sharper_one():
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model("llama"), byte_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    item = passages(lm, DOCS[:1])[0]
    logp = log_probs(model, item, lm.max_length)
    vocab = logp.shape[-1]
    uniform = score(torch.full_like(logp, -math.log(vocab)), item, None)
    sharp = score(torch.log_softmax(logp * 4.0, -1), item, None)
    assert uniform.entropy_target == pytest.approx(math.log(vocab)) and uniform.entropy_passage == pytest.approx(math.log(vocab))
    assert sharp.entropy_target < score(logp, item, None).entropy_target < uniform.entropy_target
