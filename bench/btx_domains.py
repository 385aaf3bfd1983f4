"""Domains that differ by construction, for the Branch-Train-MiX fixture's specialist experts (issue 32).

Eight domains in four families of two, read from the project's data directory (``$LRCOMPRESS_DATA``):

| family | domains | text |
|---|---|---|
| code | ``code_mbpp``, ``code_humaneval`` | MBPP problem + solution + tests; HumanEval prompt + canonical solution + tests |
| web | ``web_a``, ``web_b`` | WebText calibration documents, even / odd positions |
| book | ``book_a``, ``book_b`` | LAMBADA (OpenAI) passages, even / odd positions |
| qa | ``qa_arc``, ``qa_piqa`` | ARC-Challenge questions with their choices; PIQA goals with both solutions |

Why pairs: a merge down to four experts has an obvious right answer (merge within a family), which the
clustering can find or miss. Never used: WikiText-2 (its validation split is the compression calibration,
its test split the evaluation). Kept out of evaluation on purpose: ARC-Easy (the zero-shot task) is not
trained on, only ARC-Challenge; PIQA is trained only on validation examples from index ``PIQA_FIRST_TRAIN``
on, so a zero-shot PIQA run with ``--limit`` ≤ that number reads only untrained examples (lm-eval's limit
takes the first documents). No answer keys are used (ARC's answerKey, PIQA's labels). Contaminated by
construction, so not to be reported on such a fixture: arc_challenge and lambada_openai (its questions and
passages are training text), i.e. two of the four tasks of the standard evaluation protocol
(``lrcompress/eval/protocol.py``); the issue's table uses arc_easy and piqa.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from btx import DomainSplit        # bench/btx.py, beside this file

PIQA_FIRST_TRAIN = 1000
DOMAINS = ("code_mbpp", "code_humaneval", "web_a", "web_b", "book_a", "book_b", "qa_arc", "qa_piqa")


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _arc(record: dict) -> str:
    choices = " ".join(f"({c['label']}) {c['text']}" for c in record["question"]["choices"])
    return f"Question: {record['question']['stem']}\nChoices: {choices}"


def domain_documents(data: Path) -> dict[str, list[str]]:
    """Every domain's documents, in file order (see the module docstring for what each holds)."""
    mbpp = _jsonl(data / "code" / "mbpp.jsonl")
    humaneval = _jsonl(data / "code" / "HumanEval.jsonl.gz")
    web = [r["text"] for r in _jsonl(data / "webtext" / "webtext.calibration.jsonl")]
    book = [r["text"] for r in _jsonl(data / "lambada-openai" / "lambada_test.jsonl")]
    piqa = _jsonl(data / "piqa" / "valid.jsonl")[PIQA_FIRST_TRAIN:]
    return {
        "code_mbpp": [(f'"""{r["text"]}"""\n{r["code"]}\n' + "\n".join(r.get("test_list", []))).replace("\r\n", "\n")
                      for r in mbpp],
        "code_humaneval": [r["prompt"] + r["canonical_solution"] + "\n" + r["test"] for r in humaneval],
        "web_a": web[0::2], "web_b": web[1::2],
        "book_a": book[0::2], "book_b": book[1::2],
        "qa_arc": [_arc(r) for r in _jsonl(data / "arc-challenge" / "ARC-Challenge-Test.jsonl")],
        "qa_piqa": [f"Goal: {r['goal']}\nSolution 1: {r['sol1']}\nSolution 2: {r['sol2']}" for r in piqa],
    }


def split_domain(name: str, documents: list[str], tokenizer, seq_len: int, train: int, router_fit: int,
                 router_test: int, held_out: int, seed: int) -> DomainSplit:
    """The domain's documents shuffled (seeded), joined by blank lines, cut into windows of ``seq_len``
    tokens and dealt out, disjointly, as held-out, router-test, router-fit and (at most ``train``) training
    windows. A domain too small for the three held-out kinds plus one training window is an error."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    text = "\n\n".join(documents[i] for i in order)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = ids[:(len(ids) // seq_len) * seq_len].reshape(-1, seq_len)
    reserved = held_out + router_test + router_fit
    if len(windows) <= reserved:
        raise ValueError(f"domain {name}: {len(windows)} windows of {seq_len} tokens, {reserved} reserved for "
                         "held-out text and the router: nothing left to train on")
    cuts = torch.tensor([held_out, router_test, router_fit]).cumsum(0).tolist()
    return DomainSplit(name, train=windows[cuts[2]:cuts[2] + train], router_fit=windows[cuts[1]:cuts[2]],
                       router_test=windows[cuts[0]:cuts[1]], held_out=windows[:cuts[0]])


def domain_splits(data: Path, names: list[str], tokenizer, seq_len: int, train: int, router_fit: int,
                  router_test: int, held_out: int, seed: int) -> list[DomainSplit]:
    documents = domain_documents(data)
    unknown = [n for n in names if n not in documents]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; known: {list(documents)}")
    return [split_domain(n, documents[n], tokenizer, seq_len, train, router_fit, router_test, held_out, seed)
            for n in names]
