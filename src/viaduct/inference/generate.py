"""Text generation with a KV cache: `generate` (strings) and `generate_tokens` (token ids).

One prefill pass runs every prompt at once (left-padded into one batch, see `KVCache`), then each
decode step feeds one token per row and writes one cache slot. A row stops at its end-of-sequence
token or after `max_new_tokens`, and the loop stops once every row has. Greedy results do not depend
on the batch: each row computes what it would alone. Sampled results are reproducible for the same
`seed` and the same prompts in the same order (the rows draw from one generator).

On a GPU the decode step (one token per row: static shapes) is compiled with `torch.compile`; the
prefill, whose length changes with the prompts, runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from viaduct.config import ConfigError, Problem
from viaduct.inference.kv_cache import KVCache
from viaduct.inference.sampling import check_sampling, sample

if TYPE_CHECKING:
    from viaduct.models.gpt.model import GPTModel

DecodeStep = Callable[["GPTModel", KVCache, torch.Tensor, torch.Tensor], torch.Tensor]


class TextTokenizer(Protocol):
    """What `generate` needs of a tokenizer (every `viaduct.data.tokenizers` one has it)."""

    eod: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...


def _decode_step(
    model: GPTModel, cache: KVCache, tokens: torch.Tensor, cache_position: torch.Tensor
) -> torch.Tensor:
    """Logits [batch, vocab] (float32) of one new token per row at slot `cache_position` [1]."""
    return model(tokens, kv_cache=cache, cache_position=cache_position)[:, -1].float()


_compiled_step: DecodeStep | None = None


def _compiled_decode_step() -> DecodeStep:
    # One compiled function for the process: torch.compile caches its graphs per function, so later
    # calls with the same shapes reuse them.
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_decode_step, dynamic=False)
    return _compiled_step


def _device_of(model: GPTModel) -> torch.device:
    return model.output_weight().device


def generate_tokens(
    model: GPTModel,
    input_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    vocab_size: int | None = None,
    compile: bool | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (`input_ids`: one list of ids per prompt, none empty).

    A row ends with `eos_id` (kept as its last token) when it produces it, else after
    `max_new_tokens`, or earlier when its prompt plus the new tokens fill `model.seq_length` (the
    longest context the model has positions for). `temperature` 0 is greedy; see
    `viaduct.inference.sampling` for the rest. `seed`: the sampling generator's seed (None: drawn from
    torch's global generator, so `torch.manual_seed` decides). `vocab_size`: tokens at or above it
    (the padding rows of the output layer) are never produced; default the model's
    `config.vocab_size`. `compile`: compile the decode step (default: on a GPU only).

    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
    rows = [list(r) for r in input_ids]
    seq_length = model.seq_length
    vocab = vocab_size if vocab_size is not None else model.config.vocab_size
    limit = vocab if vocab is not None else model.vocab_size
    problems = []
    if not rows:
        problems.append(
            Problem("input_ids", "needs at least one prompt", rows, fix="pass [[token ids], ...]")
        )
    for i, r in enumerate(rows):
        if not r:
            problems.append(
                Problem(f"input_ids[{i}]", "is empty: a prompt needs at least one token", r, fix="drop it")
            )
        elif len(r) > seq_length:
            problems.append(
                Problem(
                    f"input_ids[{i}]",
                    f"has {len(r)} tokens, more than the model's seq_length ({seq_length})",
                    fix="shorten the prompt",
                )
            )
        elif any(not 0 <= t < limit for t in r):
            bad = [t for t in r if not 0 <= t < limit][:5]
            problems.append(
                Problem(
                    f"input_ids[{i}]",
                    f"holds ids outside [0, {limit})",
                    bad,
                    fix="encode the prompt with the model's own tokenizer",
                )
            )
    if problems:
        raise ConfigError(problems, header="invalid prompts")

    lengths = [len(r) for r in rows]
    # Each row's own budget: what it could generate alone within the model's positions.
    budgets = [min(max_new_tokens, seq_length - n) for n in lengths]
    out: list[list[int]] = [[] for _ in rows]
    if max(budgets) <= 0:
        return out
    device = _device_of(model)
    longest = max(lengths)
    # The last sampled token is never fed back, so the cache needs one slot less than the tokens.
    capacity = longest + max(budgets) - 1
    pads = [longest - n for n in lengths]
    ids = torch.tensor([[0] * p + r for p, r in zip(pads, rows, strict=True)], device=device)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (), device="cpu")))
    use_compile = device.type == "cuda" if compile is None else compile
    step: DecodeStep = _compiled_decode_step() if use_compile else _decode_step

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if vocab is not None and vocab < logits.shape[-1]:
            logits[:, vocab:] = float("-inf")
        return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = KVCache(model, len(rows), capacity, pad_lengths=pads)
            slots = torch.arange(capacity, device=device)
            logits = model(ids, kv_cache=cache, cache_position=slots[:longest])[:, -1].float()
            done = [False] * len(rows)
            for t in range(max(budgets)):
                next_tokens = pick(logits)
                for row, token in enumerate(next_tokens.tolist()):  # one host read per step
                    if done[row]:
                        continue
                    out[row].append(token)
                    if token == eos_id or len(out[row]) >= budgets[row]:
                        done[row] = True
                if all(done):
                    break
                position = longest + t
                logits = step(model, cache, next_tokens[:, None], slots[position : position + 1])
    finally:
        model.train(was_training)
    return out


def _eos_of(tokenizer: TextTokenizer) -> int:
    eos = getattr(tokenizer, "eos", None)
    return eos if isinstance(eos, int) else tokenizer.eod


def generate(
    model: GPTModel,
    tokenizer: TextTokenizer,
    prompts: Sequence[str] | str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    stop_at_eos: bool = True,
    compile: bool | None = None,
) -> list[str]:
    """The completion of each prompt (the new text only), in order; a single string gives a list of one.

    `eos_id`: the token that ends a completion (default the tokenizer's end of sequence / document;
    left out of the text); `stop_at_eos=False` generates through it. An empty prompt starts from the
    end-of-document token, as a new document would. See `generate_tokens` for the rest.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    eos = (eos_id if eos_id is not None else _eos_of(tokenizer)) if stop_at_eos else None
    prompt_ids = [tokenizer.tokenize(t) or [tokenizer.eod] for t in texts]
    new = generate_tokens(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_id=eos,
        vocab_size=getattr(tokenizer, "vocab_size", None),
        compile=compile,
    )
    completions = []
    for text, ids, tokens in zip(texts, prompt_ids, new, strict=True):
        if eos is not None and tokens and tokens[-1] == eos:
            tokens = tokens[:-1]
        completions.append(_completion(tokenizer, ids if text else [], tokens))
    return completions


def _completion(tokenizer: TextTokenizer, prompt: list[int], new: list[int]) -> str:
    """The text of `new` as it reads after `prompt`: decoded together, so a tokenizer that drops a
    leading space at the start of a text (SentencePiece) keeps the one between them."""
    if not prompt:
        return tokenizer.detokenize(new)
    head = tokenizer.detokenize(prompt)
    whole = tokenizer.detokenize(prompt + new)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.detokenize(new)
