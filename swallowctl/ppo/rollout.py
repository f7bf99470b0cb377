"""Rollout: prompts -> sampled responses (adapter on, KV cache on, no grad).

Every stop id of the model ends a response; what follows the first stop is padding, masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swallowctl.core.config import GenerationSection
from swallowctl.core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass
class Batch:
    """One rollout batch. Queries are left-padded, responses right-padded (after the stop)."""

    query: torch.Tensor  # [B, P] token ids
    query_mask: torch.Tensor  # [B, P] 1 for real prompt tokens
    response: torch.Tensor  # [B, R] token ids, pad after the stop token
    response_mask: torch.Tensor  # [B, R] bool, True for real response tokens (stop included)
    finished: torch.Tensor  # [B] bool: the response ended on a stop id

    @property
    def input_ids(self) -> torch.Tensor:
        import torch

        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        import torch

        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    @property
    def context_length(self) -> int:
        return int(self.query.shape[1])

    def rows(self, index: torch.Tensor | slice) -> Batch:
        return Batch(
            self.query[index],
            self.query_mask[index],
            self.response[index],
            self.response_mask[index],
            self.finished[index],
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]], max_tokens: int
) -> list[list[int]]:
    """Chat template + tokenize, each prompt cut to `max_tokens` by `fit_prompt`."""
    return [fit_prompt(tokenizer, messages, max_tokens)[1] for messages in conversations]


def fit_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_tokens: int
) -> tuple[list[dict[str, str]], list[int]]:
    """The conversation cut so that its chat-templated prompt fits in `max_tokens`, and its ids.

    The end (the question) is kept: the oldest turns go first, then the start of the oldest
    turn left. The system prompt and the template's own tokens (BOS, headers) stay whole;
    cutting the token ids instead would drop them. PPO and GRPO/RLOO both cut here.
    """
    ids = _template_ids(tokenizer, messages)
    if len(ids) <= max_tokens:
        return messages, ids
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head) :]
    while len(turns) > 1:
        turns = turns[1:]
        ids = _template_ids(tokenizer, head + turns)
        if len(ids) <= max_tokens:
            return head + turns, ids
    last = turns[0]
    content = tokenizer(last["content"], add_special_tokens=False)["input_ids"]

    def keeping(k: int) -> list[dict[str, str]]:
        tail = str(tokenizer.decode(content[len(content) - k :])) if k else ""
        # A cut inside a multi-byte character decodes to U+FFFD: drop that partial character.
        return [*head, {**last, "content": tail.lstrip("\ufffd")}]

    lo, hi = 0, len(content)  # the largest k whose prompt fits: prompt length grows with k
    ids = _template_ids(tokenizer, keeping(0))
    if len(ids) > max_tokens:
        raise ConfigError(
            f"data.max_prompt_tokens: {max_tokens} tokens, but the chat template and system "
            f"prompt alone take {len(ids)}",
            hint="raise data.max_prompt_tokens, or shorten the mode's system prompt",
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_template_ids(tokenizer, keeping(mid))) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    fitted = keeping(lo)
    return fitted, _template_ids(tokenizer, fitted)


def _template_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already wrote BOS as text: adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def cut_at_stop(
    response: torch.Tensor, stop_ids: tuple[int, ...], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first stop token; pad the rest.

    Returns (response, mask, finished).
    """
    import torch

    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device))
    # Positions strictly after the first stop are not part of the answer.
    after_stop = (is_stop.long().cumsum(dim=1) - is_stop.long()) > 0
    mask = ~after_stop
    return response.masked_fill(after_stop, pad_id), mask, is_stop.any(dim=1)


def generate(
    model: Any,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    gen: GenerationSection,
    stop_ids: tuple[int, ...],
    pad_id: int,
    *,
    greedy: bool = False,
) -> Batch:
    """Sample (or, for evaluation, greedily decode) responses for one chunk of prompts."""
    import torch

    sampling = (
        {}
        if greedy
        else {
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "top_k": gen.top_k,
            "typical_p": gen.typical_p,
            "min_p": gen.min_p or None,
        }
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=query,
            attention_mask=query_mask,
            do_sample=not greedy,
            **sampling,
            max_new_tokens=gen.max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            use_cache=True,
        )
    response, mask, finished = cut_at_stop(out[:, query.shape[1] :], stop_ids, pad_id)
    if response.shape[1] == 0:  # max_new_tokens reached 0 tokens: keep one pad column
        response = torch.full((query.shape[0], 1), pad_id, device=query.device)
        mask = torch.zeros_like(response, dtype=torch.bool)
    return Batch(query, query_mask, response, mask, finished)


def concat(batches: list[Batch], pad_id: int) -> Batch:
    """Join chunks generated separately: queries re-left-padded, responses re-right-padded."""
    import torch

    p = max(b.query.shape[1] for b in batches)
    r = max(b.response.shape[1] for b in batches)

    def pad(x: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = width - x.shape[1]
        if extra == 0:
            return x
        fill = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
        return torch.cat([fill, x] if left else [x, fill], dim=1)

    return Batch(
        torch.cat([pad(b.query, p, pad_id, True) for b in batches]),
        torch.cat([pad(b.query_mask, p, 0, True) for b in batches]),
        torch.cat([pad(b.response, r, pad_id, False) for b in batches]),
        torch.cat([pad(b.response_mask, r, False, False) for b in batches]),
        torch.cat([b.finished for b in batches]),
    )
