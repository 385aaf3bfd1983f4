"""lm-eval's HFLM with the context of a multiple-choice question run once for all of its answers.

lm-eval scores a multiple-choice document as one log-likelihood request per choice, each the whole
context followed by that answer, so ARC (four choices) runs every question four times and PIQA twice:
of the 86k tokens the four shipped tasks feed the model at 200 documents, 38k are repeated contexts
(lm-eval's own ``HFLM._loglikelihood_tokens`` carries the TODO "lumps together requests with the same
context"). Here the requests that share a context are scored from one forward of that context, whose
key/value cache is then repeated for each continuation: the same conditional log-probabilities
log p(cont | ctx), summed per request, and the same greedy check, only without recomputing the context.
Requests with a context of their own (LAMBADA), groups whose continuations outweigh the repeated
context (PIQA's long solutions: padded in a batch they would cost more than the repeat saves) and
requests that lm-eval would truncate go through HFLM's own path unchanged. The numbers equal HFLM's up to float rounding (the context's tokens are the same,
batched differently; ``tests/eval/test_shared_context.py`` compares the two).

Contexts are batched ``batch_size`` at a time, left-padded with an attention mask and explicit
positions, so every context's last token is in the last column and each continuation starts at its own
context's length.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

Request = tuple[tuple[str, str], list[int], list[int]]


class SharedContextLM(HFLM):
    """HFLM whose causal log-likelihoods run a shared context once (see the module docstring)."""

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (_, context, continuation) in enumerate(requests):
            groups[tuple(context)].append(index)
        shared = [members for context, members in groups.items()
                  if self._worth_sharing(len(context), [len(requests[i][2]) for i in members])]
        alone = sorted(set(range(len(requests))) - {i for members in shared for i in members})
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if alone:
            scored = super()._loglikelihood_tokens([requests[i] for i in alone], disable_tqdm, override_bs)
            for index, answer in zip(alone, scored, strict=True):
                results[index] = answer
        shared.sort(key=lambda members: (len(requests[members[0]][1]), max(len(requests[i][2]) for i in members)))
        size = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else 1
        for start in range(0, len(shared), size):
            chunk = shared[start:start + size]
            answers = self._score_groups([requests[m[0]][1] for m in chunk],
                                         [[requests[i][2] for i in m] for m in chunk])
            for index, answer in zip([i for m in chunk for i in m], answers, strict=True):
                results[index] = answer
                self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        return results

    def _worth_sharing(self, context: int, continuations: list[int]) -> bool:
        """Shared when the context's repeats outweigh the continuations (ARC's questions and short answers;
        not PIQA's short goals and long solutions, whose padding in a batch would cost more than the repeat
        saves), and no request is longer than the last max_length + 1 tokens that HFLM keeps."""
        return (self.backend == "causal" and len(continuations) > 1
                and (len(continuations) - 1) * context >= sum(continuations)
                and context + max(continuations) <= self.max_length + 1)

    @torch.no_grad()
    def _score_groups(self, contexts: list[list[int]], continuations: list[list[list[int]]]
                      ) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), greedy?) for every continuation of every context, in order."""
        first, cache, context_mask = self._run_contexts(contexts)
        rows = torch.tensor([g for g, conts in enumerate(continuations) for _ in conts], device=self.device)
        flat = [cont for conts in continuations for cont in conts]
        first_logp = F.log_softmax(first.float(), dim=-1)[rows]                 # predicts each cont[0]
        rest_logp = self._run_continuations(flat, rows, cache, context_mask, [len(c) for c in contexts])
        answers = []
        for row, cont in enumerate(flat):
            logp = first_logp[row:row + 1] if rest_logp is None else torch.cat(
                [first_logp[row:row + 1], rest_logp[row, :len(cont) - 1]])
            tokens = torch.tensor(cont, device=self.device)
            answers.append((float(logp.gather(1, tokens[:, None]).sum()),
                            bool((logp.argmax(dim=-1) == tokens).all())))
        return answers

    def _run_contexts(self, contexts: list[list[int]]) -> tuple[torch.Tensor, object, torch.Tensor]:
        """One forward of the left-padded contexts: the last position's logits, the cache and the mask."""
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), self._pad_id(), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, context in enumerate(contexts):
            ids[row, width - len(context):] = torch.tensor(context, device=self.device)
            mask[row, width - len(context):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values, mask

    def _run_continuations(self, continuations: list[list[int]], rows: torch.Tensor, cache: object,
                           context_mask: torch.Tensor, lengths: list[int]) -> torch.Tensor | None:
        """Log-probabilities after each continuation's tokens but its last, on its context's cache (None
        when every continuation is one token)."""
        width = max(len(c) for c in continuations) - 1
        if width == 0:
            return None
        cache.reorder_cache(rows)                    # one copy of its context's keys and values per row
        ids = torch.full((len(continuations), width), self._pad_id(), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, cont in enumerate(continuations):
            ids[row, :len(cont) - 1] = torch.tensor(cont[:-1], device=self.device)
            mask[row, :len(cont) - 1] = 1
        starts = torch.tensor(lengths, device=self.device)[rows]
        positions = starts[:, None] + torch.arange(width, device=self.device)[None]
        out = self.model(input_ids=ids, attention_mask=torch.cat([context_mask[rows], mask], dim=1),
                         position_ids=positions, past_key_values=cache, use_cache=True)
        return F.log_softmax(out.logits.float(), dim=-1)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id or 0)
