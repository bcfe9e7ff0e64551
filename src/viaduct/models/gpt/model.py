"""`GPTModel`: a decoder-only language model in plain PyTorch (Megatron's module names).

Parameter names follow Megatron Core's GPTModel (`embedding.word_embeddings.weight`,
`decoder.layers.0.self_attention.linear_qkv.weight`, `decoder.final_layernorm.weight`,
`output_layer.weight`), so checkpoints read familiarly.

A pipeline stage is a `GPTModel` too: it holds only its layers (still named by their global index,
`decoder.layers.<i>...`), the embedding only on the first stage and the final norm and output layer
only on the last. With tied embeddings the last stage keeps its own copy of the token table under the
same name (see `GPTModel.tied_output_weight`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from viaduct.config.types import torch_dtype
from viaduct.models.common.loss import cross_entropy, linear_cross_entropy, use_chunked_loss
from viaduct.models.common.norms import Norm
from viaduct.models.common.rotary import RotaryEmbedding
from viaduct.models.common.transformer import TransformerBlock

if TYPE_CHECKING:
    from viaduct.distributed.pipeline_split import StageSpec
    from viaduct.inference.kv_cache import KVCache
    from viaduct.models.gpt.provider import GPTModelProvider


class VocabOutput(Protocol):
    """The output layer and loss, replaceable from outside the model (tensor parallelism splits the
    vocabulary across processes). `weight` is the output weight as the model holds it."""

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] of the hidden states [batch, seq, hidden]."""
        ...

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [batch, seq] (float32)."""
        ...


class LanguageModelEmbedding(nn.Module):
    """Token embeddings, plus learned absolute position embeddings when configured, then dropout.

    `output_copy`: only the token table, as the tied output weight of a last pipeline stage that is
    not the first (never used for input, so no position embeddings).
    """

    def __init__(
        self,
        cfg: GPTModelProvider,
        vocab_size: int,
        *,
        output_copy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.position_embeddings: nn.Embedding | None = None
        if cfg.position_embedding_type == "learned_absolute" and not output_copy:
            self.position_embeddings = nn.Embedding(
                cfg.seq_length, cfg.hidden_size, device=device, dtype=dtype
            )
        self.dropout = cfg.hidden_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.word_embeddings(input_ids)  # [batch, seq, hidden]
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            h = h + self.position_embeddings(position_ids)
        return F.dropout(h, self.dropout, self.training)


class GPTModel(nn.Module):
    """Embedding -> transformer layers -> final norm -> output layer (-> per-token loss).

    `forward(input_ids, position_ids=None, attention_mask=None, labels=None)` returns logits
    [batch, seq, vocab], or the per-token loss [batch, seq] (float32) when `labels` are given.
    `attention_mask` follows Megatron: a bool tensor broadcastable to [batch, 1, seq, seq] where True
    means *masked out*; unset means causal. Build it with `GPTModelProvider.provide()`. With
    `kv_cache=` and `cache_position=` it runs one generation step over a `viaduct.inference.KVCache`
    (see `forward`).

    A pipeline stage (`layers`, by default the `stage`'s; pre_process / post_process as the stage
    says) takes its input from `set_input_tensor` unless it is the first, and returns the hidden
    states [batch, seq, hidden] unless it is the last. `stage` records which stage it is (None: the
    whole model).
    """

    def __init__(
        self,
        cfg: GPTModelProvider,
        vocab_size: int,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        layers: Sequence[int] | None = None,
        stage: StageSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size, self.seq_length = vocab_size, cfg.seq_length
        self.pre_process, self.post_process = pre_process, post_process
        self.stage: StageSpec | None = stage
        """The pipeline stage this model is (None: the whole model, built without pipeline parallelism)."""
        self.tied = cfg.share_embeddings_and_output_weights
        # The last stage of a tied model that is not also the first holds its own copy of the token
        # table, under the same name (the runtime keeps the two copies equal by summing their gradients).
        self.embedding: LanguageModelEmbedding | None = None
        if pre_process or (self.tied and post_process):
            self.embedding = LanguageModelEmbedding(
                cfg, vocab_size, output_copy=not pre_process, device=device, dtype=dtype
            )
        self.rotary: RotaryEmbedding | None = None
        if cfg.position_embedding_type == "rope":
            assert cfg.kv_channels is not None
            self.rotary = RotaryEmbedding(
                cfg.kv_channels,
                cfg.seq_length,
                base=cfg.rotary_base,
                percent=cfg.rotary_percent,
                interleaved=cfg.rotary_interleaved,
                llama3_scaling_factor=cfg.rope_scaling_factor if cfg.rope_scaling else None,
                interpolation_factor=cfg.seq_len_interpolation_factor,
                device=device,
            )
        if layers is None and stage is not None:
            layers = stage.layers
        self.decoder = TransformerBlock(
            cfg, layers=layers, post_process=post_process, device=device, dtype=dtype
        )
        self.output_layer: nn.Linear | None = None
        if post_process and not self.tied:
            self.output_layer = nn.Linear(cfg.hidden_size, vocab_size, bias=False, device=device, dtype=dtype)
        self.fp32_residual = cfg.fp32_residual_connection
        self.fused_loss = cfg.cross_entropy_loss_fusion
        self.upcast_loss = not cfg.fp16_lm_cross_entropy
        self.logit_dtype = torch_dtype(cfg.logit_dtype) if cfg.logit_dtype is not None else None
        self.autocast_dtype = (
            torch_dtype(cfg.autocast_dtype) if cfg.enable_autocast and cfg.autocast_dtype else None
        )
        # Tuning of the fused loss (see viaduct.models.common.loss): tokens per chunk (None: sized from
        # the vocabulary), the logits size under which they are kept rather than recomputed (None:
        # 10% of the GPU's memory), and on a CPU the size under which the plain path is taken instead
        # (None: CPU_PLAIN_LOSS_BYTES; 0 always chunks).
        self.loss_chunk_tokens: int | None = None
        self.loss_keep_logits_bytes: int | None = None
        self.loss_plain_bytes: int | None = None
        self._input_tensor: torch.Tensor | None = None
        self.vocab_output: VocabOutput | None = None
        """Set from outside to replace the output layer and loss (see `VocabOutput`); None: local."""

    # ------------------------------------------------------------------ weights

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight [vocab, hidden]: the token table (or its copy on the last
        pipeline stage) when tied. Only on a model built with post_process."""
        if self.output_layer is not None:
            return self.output_layer.weight
        assert self.embedding is not None, "a model built with post_process=False has no output weight"
        return self.embedding.word_embeddings.weight

    def tied_output_weight(self) -> nn.Parameter | None:
        """The last pipeline stage's copy of the tied token table, when this model is such a stage.

        With share_embeddings_and_output_weights, a last stage that is not also the first holds its own
        `embedding.word_embeddings.weight` (only the output layer reads it). It starts equal to the
        first stage's table (`init_weights` gives both the same values), and stays equal when the
        runtime adds the two copies' gradients together before each optimizer step; a checkpoint
        stores the name once. None for every other model (a whole model, or any other stage).
        """
        if self.tied and self.post_process and not self.pre_process and self.embedding is not None:
            return cast(nn.Parameter, self.embedding.word_embeddings.weight)
        return None

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialize every parameter and buffer from the config (also after building on `meta`).

        Linear weights ~ N(0, init_method_std); the projections back into the residual stream
        (attention output, fc2) ~ N(0, init_method_std / sqrt(2 x num_layers)), num_layers being the
        whole model's; embeddings ~ N(0, embedding_init_method_std); biases 0; norm scales 1 (0 with
        zero-centred gamma).

        Each part (`embedding.word_embeddings`, `embedding.position_embeddings`, each
        `decoder.layers.<i>`, `decoder.final_layernorm`, `output_layer`, or any other module by its
        name) draws from its own generator, seeded from `seed` and the part's name: the same part gets
        the same values whichever pipeline stage builds it, and the tied token table's copy on the last
        stage equals the first stage's. `seed` None draws one seed from torch's global generator, so
        `torch.manual_seed` decides the weights and two models built in a row differ.

        A parameter that is a DTensor (already sharded: the meta-device build of a parallel model)
        cannot take a generator; it draws from torch's global generator in module order instead, so
        such weights depend on the parallel layout.
        """
        if seed is None:
            seed = draw_init_seed()
        cfg = self.config
        std = cfg.init_method_std
        out_std = std / math.sqrt(2.0 * cfg.num_layers)
        emb_std = cfg.embedding_init_method_std or std
        generators: dict[tuple[str, torch.device], torch.Generator] = {}

        def generator(part: str, t: torch.Tensor) -> torch.Generator | None:
            if t.is_meta or _is_dtensor(t):
                return None
            key = (part, t.device)
            if key not in generators:
                generators[key] = torch.Generator(device=t.device).manual_seed(part_seed(seed, part))
            return generators[key]

        for name, module in self.named_modules():
            part = _init_part(name)
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                w = module.weight
                w_std = out_std if last in ("linear_proj", "linear_fc2") else std
                nn.init.normal_(w, 0.0, w_std, generator=generator(part, w))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, emb_std, generator=generator(part, module.weight))
            elif isinstance(module, (Norm, RotaryEmbedding)):
                module.reset_parameters()

    # ------------------------------------------------------------------ pipeline hooks

    def set_input_tensor(self, tensor: torch.Tensor) -> None:
        """Hidden states [batch, seq, hidden] for a stage built with pre_process=False (the previous
        stage's output); the next `forward` starts from them. Ignored on a first stage."""
        self._input_tensor = tensor

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """On a stage built with pre_process=False only the shape [batch, seq] of `input_ids` is read
        (the sequence length, for the rotary embedding); the input is the tensor of `set_input_tensor`.
        `labels` matter only with post_process.

        Generation (`viaduct.inference`): with `kv_cache` (a `viaduct.inference.KVCache`) the new
        tokens take the cache slots `cache_position` (int64 [seq]), their keys and values are stored
        there and they attend over everything cached before them; `position_ids` default to the
        cache's (slot minus the row's left padding) and the mask is the cache's, so `attention_mask`
        and `labels` must be unset. Without a cache nothing of this runs.
        """
        if kv_cache is not None:
            return self._forward_cached(
                input_ids, position_ids, attention_mask, labels, kv_cache, cache_position
            )
        seq_len = input_ids.shape[1]
        if seq_len > self.seq_length:
            raise ValueError(
                f"input sequence length {seq_len} exceeds model.seq_length ({self.seq_length}); "
                "raise model.seq_length or feed shorter sequences"
            )
        if self.pre_process:
            assert self.embedding is not None
            h = self.embedding(input_ids, position_ids)
        elif self._input_tensor is not None:
            h = self._input_tensor
        else:
            raise RuntimeError("a model built with pre_process=False needs set_input_tensor() first")
        if self.fp32_residual:
            h = h.float()
        rope = self.rotary(seq_len, position_ids) if self.rotary is not None else None
        allowed = None if attention_mask is None else ~attention_mask.bool()
        autocast = (
            torch.autocast(h.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            h = self.decoder(h, rope, allowed)  # final norm included with post_process
            if not self.post_process:
                return h
            if labels is None:
                if self.vocab_output is not None:
                    logits = self.vocab_output.logits(h, self.output_weight())
                else:
                    logits = F.linear(h, self.output_weight())
                return logits.to(self.logit_dtype) if self.logit_dtype is not None else logits
            return self.loss(h, labels)

    def _forward_cached(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        kv_cache: KVCache,
        cache_position: torch.Tensor | None,
    ) -> torch.Tensor:
        """`forward` with a KV cache: logits [batch, seq, vocab] of the new tokens (see `forward`)."""
        if attention_mask is not None or labels is not None or cache_position is None:
            raise ValueError(
                "forward with kv_cache takes cache_position and no attention_mask or labels "
                "(the cache builds the mask; generation computes no loss)"
            )
        if not (self.pre_process and self.post_process) or self.embedding is None:
            raise ValueError("generation with a KV cache needs the whole model, not one pipeline stage")
        if position_ids is None:
            position_ids = kv_cache.position_ids(cache_position)
        h = self.embedding(input_ids, position_ids)
        if self.fp32_residual:
            h = h.float()
        rope = self.rotary(input_ids.shape[1], position_ids) if self.rotary is not None else None
        allowed = kv_cache.attention_mask(cache_position)
        autocast = (
            torch.autocast(h.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            h = self.decoder(h, rope, allowed, kv_cache.layers, cache_position)
            if self.vocab_output is not None:
                logits = self.vocab_output.logits(h, self.output_weight())
            else:
                logits = F.linear(h, self.output_weight())
        return logits.to(self.logit_dtype) if self.logit_dtype is not None else logits

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy [batch, seq] (float32) of the final hidden states."""
        weight = self.output_weight()
        if self.vocab_output is not None:
            return self.vocab_output.loss(hidden, weight, labels)
        device = hidden.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        if self.fused_loss and use_chunked_loss(
            device,
            labels.numel(),
            weight.shape[0],
            autocast or hidden.dtype,
            plain_budget_bytes=self.loss_plain_bytes,
        ):
            if autocast is not None:
                hidden, weight = hidden.to(autocast), weight.to(autocast)
            return linear_cross_entropy(
                hidden,
                weight,
                labels,
                chunk_tokens=self.loss_chunk_tokens,
                keep_logits_bytes=self.loss_keep_logits_bytes,
            )
        # The fused loss diverted to the plain path by the device rule keeps its float32 softmax.
        return cross_entropy(F.linear(hidden, weight), labels, upcast=self.upcast_loss or self.fused_loss)


def draw_init_seed() -> int:
    """One seed for `GPTModel.init_weights`, drawn from torch's global CPU generator (so
    `torch.manual_seed` decides it, whatever the default device)."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def part_seed(seed: int, part: str) -> int:
    """The seed of one part's generator: a stable hash (the same in every process and run) of the
    model's seed and the part's name, as a non-negative 63-bit integer."""
    digest = hashlib.blake2b(f"{seed}/{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _init_part(module_name: str) -> str:
    """The part a module's initialization belongs to: its transformer layer (`decoder.layers.<i>`),
    else the module itself."""
    parts = module_name.split(".")
    if parts[:2] == ["decoder", "layers"] and len(parts) > 2:
        return ".".join(parts[:3])
    return module_name


def _is_dtensor(t: torch.Tensor) -> bool:
    # Model code does not import torch.distributed: without its tensor module loaded, no DTensor exists.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
