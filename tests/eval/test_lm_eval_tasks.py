"""lm-eval on the shipped local tasks, checked against a log-likelihood computation of our own."""
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import byte_tokenizer, tiny_model
from task_fixtures import ARC, LAMBADA, PIQA, PIQA_LABELS

from lrcompress.errors import LrcompressError
from lrcompress.eval.lm_eval_tasks import evaluate_tasks, parse_tasks
from lrcompress.eval.task_data import TASK_DATA, task_docs

TASKS = ["arc_easy", "arc_challenge", "piqa", "lambada_openai"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    # Positions enough for every prompt: lm-eval would truncate longer ones from the left.
    return tiny_model("llama", max_position_embeddings=1024), byte_tokenizer()


NETWORK_ATTEMPTS: list = []


@pytest.fixture(scope="module")
def results(model_and_tokenizer, task_data_dir):
    """All four tasks in one lm-eval call, with every socket connection refused and recorded."""
    import socket

    def refuse(self, address, *args):
        NETWORK_ATTEMPTS.append(address)
        raise OSError(f"test: network access to {address} refused")

    model, tokenizer = model_and_tokenizer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        return evaluate_tasks(model, tokenizer, TASKS, limit=3, batch_size=2, data_directory=task_data_dir)


def test_nothing_reaches_for_the_network(results):
    assert NETWORK_ATTEMPTS == []


@torch.no_grad()
def continuation_scores(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(sum log p(continuation | context), greedy decoding reproduces it), on byte tokens."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logprobs[torch.arange(len(cont)), target].sum()), bool((logprobs.argmax(-1) == target).all())


def expected_choice_metrics(model, tokenizer, docs) -> tuple[float, float]:
    """acc and acc_norm (log-likelihood divided by the choice's length in characters)."""
    acc = acc_norm = 0
    for context, choices, gold in docs:
        scores = [continuation_scores(model, tokenizer, context, " " + choice)[0] for choice in choices]
        acc += max(range(len(choices)), key=lambda i: scores[i]) == gold
        acc_norm += max(range(len(choices)), key=lambda i: scores[i] / len(choices[i])) == gold
    return acc / len(docs), acc_norm / len(docs)


def arc_docs(rows):
    return [(f"Question: {r['question']['stem']}\nAnswer:", [c["text"] for c in r["question"]["choices"]],
             [c["label"] for c in r["question"]["choices"]].index(r["answerKey"])) for r in rows]


@pytest.mark.parametrize("task, docs", [("arc_easy", arc_docs(ARC)), ("arc_challenge", arc_docs(ARC[::-1])),
                                        ("piqa", [(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], label)
                                                  for r, label in zip(PIQA, PIQA_LABELS)])])
def test_multiple_choice_tasks_score_like_our_own_loglikelihoods(results, model_and_tokenizer, task, docs):
    acc, acc_norm = expected_choice_metrics(*model_and_tokenizer, docs)
    result = results[task]
    assert result["samples"] == 3
    assert result["acc"] == pytest.approx(acc)
    assert result["acc_norm"] == pytest.approx(acc_norm)
    # stderr of a mean of 0/1 outcomes over n documents (sample standard deviation / sqrt(n))
    assert result["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) * 3 / 2 / 3))
    assert set(result["protocols"]) == {"acc", "acc_norm"}
    assert task.split("_")[0] in result["source"].lower().replace("-", "_")


def test_per_document_scores_are_each_documents_own_and_average_to_the_accuracy(model_and_tokenizer, task_data_dir):
    model, tokenizer = model_and_tokenizer
    results = evaluate_tasks(model, tokenizer, ["arc_easy", "lambada_openai"], limit=3, batch_size=2,
                             data_directory=task_data_dir, per_document=True)
    arc = results["arc_easy"]
    assert set(arc["per_document"]) == {"acc", "acc_norm"}
    expected = [expected_choice_metrics(model, tokenizer, [doc]) for doc in arc_docs(ARC)]   # one document each
    assert arc["per_document"]["acc"] == [acc for acc, _ in expected]
    assert arc["per_document"]["acc_norm"] == [norm for _, norm in expected]
    assert sum(arc["per_document"]["acc"]) / 3 == pytest.approx(arc["acc"])
    # lambada: its 0/1 acc per document, not the log-likelihoods its corpus-level perplexity is made of
    assert set(results["lambada_openai"]["per_document"]) == {"acc"}
    assert "per_document" not in evaluate_tasks(model, tokenizer, ["arc_easy"], limit=1, batch_size=2,
                                                data_directory=task_data_dir)["arc_easy"]


def test_lambada_scores_like_our_own_loglikelihoods(results, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scores = [continuation_scores(model, tokenizer, " ".join(r["text"].split(" ")[:-1]), " " + r["text"].split(" ")[-1])
              for r in LAMBADA]
    result = results["lambada_openai"]
    assert result["perplexity"] == pytest.approx(math.exp(-sum(s for s, _ in scores) / 3), rel=1e-4)
    assert result["acc"] == pytest.approx(sum(greedy for _, greedy in scores) / 3)
    # labeled as lm-eval's target-word perplexity, not token-level perplexity
    assert result["protocols"]["perplexity"].startswith("lm-eval target-word perplexity")
    assert "token-level" not in result["protocols"]["perplexity"].replace("not token-level", "")


def test_missing_local_file_is_named(model_and_tokenizer, tmp_path):
    with pytest.raises(LrcompressError, match="arc-easy/ARC-Easy-Test.jsonl"):
        evaluate_tasks(*model_and_tokenizer, ["arc_easy"], limit=1, data_directory=tmp_path)


def test_no_data_directory_and_no_hub_is_a_clear_error():
    with pytest.raises(LrcompressError, match="no data directory set.*allenai/ai2_arc"):
        task_docs("arc_easy", None)


def test_malformed_local_file_names_file_and_line(tmp_path):
    path = tmp_path / "lambada-openai" / "lambada_test.jsonl"
    path.parent.mkdir()
    path.write_text('{"text": "one two three"}\n{"text": broken\n')
    with pytest.raises(LrcompressError, match=r"lambada_test.jsonl:2"):
        task_docs("lambada_openai", tmp_path)


def test_piqa_label_count_mismatch(task_data_dir, tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text((task_data_dir / "piqa" / "valid.jsonl").read_text())
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(LrcompressError, match="2 labels for 3 questions"):
        task_docs("piqa", tmp_path)


def test_parse_tasks():
    assert parse_tasks("arc_easy, piqa,arc_easy") == ["arc_easy", "piqa"]
    with pytest.raises(LrcompressError):
        parse_tasks(" , ")


def test_importing_lrcompress_does_not_import_lm_eval():
    import subprocess

    code = ("import sys, lrcompress, lrcompress.runner, lrcompress.cli.main, lrcompress.results.gate; "
            "print([m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'matplotlib', 'datasets')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_shared_release_files_parse_completely(data_dir):
    """Every record of the real files reads, with the counts their SOURCES.md gives."""
    counts = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "lambada_openai": 5153}
    for task, count in counts.items():
        docs, source = task_docs(task, data_dir)
        assert len(docs) == count, task
        assert str(data_dir) in source
    first = json.loads((data_dir / "arc-easy" / "ARC-Easy-Test.jsonl").read_text().splitlines()[0])
    doc = task_docs("arc_easy", data_dir)[0][0]
    labels = [c["label"] for c in first["question"]["choices"]]
    assert doc["choices"][doc["gold"]] == first["question"]["choices"][labels.index(first["answerKey"])]["text"]
    assert set(TASK_DATA) == set(counts)
