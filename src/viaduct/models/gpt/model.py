"""`GPTModel`: a decoder-only language model in plain PyTorch (Megatron's module names).

Parameter names follow Megatron Core's GPTModel (`embedding.word_embeddings.weight`,
`decoder.layers.0.self_attention.linear_qkv.weight`, `decoder.final_layernorm.weight`,
`output_layer.weight`), so checkpoints read familiarly.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from viaduct.config.types import torch_dtype
from viaduct.models.common.loss import cross_entropy, linear_cross_entropy, use_chunked_loss
from viaduct.models.common.norms import Norm
from viaduct.models.common.rotary import RotaryEmbedding
from viaduct.models.common.transformer import TransformerBlock

if TYPE_CHECKING:
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
    """Token embeddings, plus learned absolute position embeddings when configured, then dropout."""

    def __init__(
        self,
        cfg: GPTModelProvider,
        vocab_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.position_embeddings: nn.Embedding | None = None
        if cfg.position_embedding_type == "learned_absolute":
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
    means *masked out*; unset means causal. Build it with `GPTModelProvider.provide()`.
    """

    def __init__(
        self,
        cfg: GPTModelProvider,
        vocab_size: int,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size, self.seq_length = vocab_size, cfg.seq_length
        self.pre_process, self.post_process = pre_process, post_process
        self.tied = cfg.share_embeddings_and_output_weights
        self.embedding = (
            LanguageModelEmbedding(cfg, vocab_size, device=device, dtype=dtype) if pre_process else None
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
        self.decoder = TransformerBlock(cfg, post_process=post_process, device=device, dtype=dtype)
        self.output_layer: nn.Linear | None = None
        if post_process and not (self.tied and pre_process):
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
        """The output layer's weight [vocab, hidden]: the embedding table itself when tied."""
        if self.output_layer is not None:
            return self.output_layer.weight
        assert self.embedding is not None
        return self.embedding.word_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter and buffer from the config (also after building on `meta`).

        Linear weights ~ N(0, init_method_std); the projections back into the residual stream
        (attention output, fc2) ~ N(0, init_method_std / sqrt(2 x num_layers)); embeddings ~
        N(0, embedding_init_method_std); biases 0; norm scales 1 (0 with zero-centred gamma).
        """
        cfg = self.config
        std = cfg.init_method_std
        out_std = std / math.sqrt(2.0 * cfg.num_layers)
        emb_std = cfg.embedding_init_method_std or std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, 0.0, out_std if last in ("linear_proj", "linear_fc2") else std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, emb_std)
            elif isinstance(module, (Norm, RotaryEmbedding)):
                module.reset_parameters()

    # ------------------------------------------------------------------ pipeline hooks

    def set_input_tensor(self, tensor: torch.Tensor) -> None:
        """Hidden states [batch, seq, hidden] for a stage built with pre_process=False."""
        self._input_tensor = tensor

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.seq_length:
            raise ValueError(
                f"input sequence length {seq_len} exceeds model.seq_length ({self.seq_length}); "
                "raise model.seq_length or feed shorter sequences"
            )
        if self.embedding is not None:
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
