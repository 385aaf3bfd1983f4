"""SharedContextLM (a shared context run once) against lm-eval's own HFLM on the same requests."""
import random

import pytest
import torch

from helpers import byte_tokenizer, tiny_model

pytest.importorskip("lm_eval")


def requests_with_shared_contexts(tokenizer, seed: int = 0):
    """Contexts of different lengths (left padding in a batch), each with 1-4 continuations of 1-6
    tokens (one-token ones included), in shuffled order, as lm-eval's loglikelihood hands them over."""
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "x"]
    requests = []
    for _ in range(9):
        context = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        for _ in range(rng.randint(1, 4)):
            continuation = rng.choice(["", " "]) + "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 5)))
            requests.append(((context, continuation), tokenizer(context, add_special_tokens=False)["input_ids"],
                             tokenizer(continuation, add_special_tokens=False)["input_ids"]))
    rng.shuffle(requests)
    return requests


@pytest.mark.parametrize("batch_size", [1, 3])
def test_shared_contexts_score_as_hflm_does(batch_size):
    from lm_eval.models.huggingface import HFLM

    from lrcompress.eval.shared_context import SharedContextLM

    model, tokenizer = tiny_model("llama", max_position_embeddings=256), byte_tokenizer()
    requests = requests_with_shared_contexts(tokenizer)
    assert len({tuple(r[1]) for r in requests}) < len(requests)          # some contexts are shared
    assert any(len(r[2]) == 1 for r in requests) and any(len(r[2]) > 3 for r in requests)
    expected = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                    device="cpu")._loglikelihood_tokens(requests, disable_tqdm=True)
    shared = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    got = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    torch.testing.assert_close(torch.tensor([score for score, _ in got], dtype=torch.float64),
                               torch.tensor([score for score, _ in expected], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert all(score < 0 for score, _ in got)
    assert len(calls) < len(requests)          # contexts ran once per group, batched


def test_a_request_longer_than_the_window_takes_hflms_path():
    from lrcompress.eval.shared_context import SharedContextLM

    model, tokenizer = tiny_model("llama", max_position_embeddings=256), byte_tokenizer()
    lm = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu", max_length=16)
    context = tokenizer("a long shared context of many bytes", add_special_tokens=False)["input_ids"]
    requests = [(("c", " x"), context, [70]), (("c", " y"), context, [71])]
    truncated = lm._loglikelihood_tokens(requests, disable_tqdm=True)     # HFLM truncates from the left
    scored_alone = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu",
                                   max_length=16)._loglikelihood_tokens(requests[:1], disable_tqdm=True)
    assert truncated[0][0] == pytest.approx(scored_alone[0][0], abs=1e-6)
