"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

`sample(logits, temperature=..., top_k=..., top_p=..., generator=...)`: temperature 0 is greedy
(argmax, no randomness); otherwise the logits are divided by the temperature, restricted to the k
most likely tokens (`top_k`; None or 0: all), then to the smallest set of most likely tokens whose
probability reaches `top_p` (1: all), and one token is drawn with `generator` (a seeded
`torch.Generator` on the logits' device gives the same draws every time).
"""

from __future__ import annotations

import math

import torch

from viaduct.config import ConfigError, Problem


def check_sampling(
    *, temperature: float, top_k: int | None, top_p: float, max_new_tokens: int | None = None
) -> None:
    """Raise `ConfigError` with every invalid sampling setting at once."""
    problems: list[Problem] = []
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        problems.append(
            Problem("temperature", "must be a finite number >= 0 (0: greedy)", temperature, fix="e.g. 0.8")
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        problems.append(
            Problem("top_k", "must be an integer >= 0 (0 or unset: no limit)", top_k, fix="e.g. 50")
        )
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        problems.append(Problem("top_p", "must be in (0, 1] (1: no limit)", top_p, fix="e.g. 0.95"))
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0
    ):
        problems.append(Problem("max_new_tokens", "must be an integer >= 0", max_new_tokens, fix="e.g. 64"))
    if problems:
        raise ConfigError(problems, header="invalid generation settings")


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """`logits` [batch, vocab] with every token outside the top-k / top-p support set to -inf."""
    out = logits
    vocab = logits.shape[-1]
    if top_k is not None and 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token is dropped when the tokens before it already reach top_p; the most likely one
        # always stays (its preceding mass is 0).
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [batch] (int64) of each row of `logits` [batch, vocab]."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
