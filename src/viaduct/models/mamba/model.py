"""`MambaModel`: a Mamba-2 / hybrid decoder-only language model, a `GPTModel` with another layer stack.

Everything but the layers is GPT's: the embedding, the final norm, the output layer, the fused loss,
the `vocab_output` hook and the per-part seeded initialization. The layers, keyed by their global
index in a `LayerStack` as GPT's are, follow `hybrid_layer_pattern`:

- `MambaLayer` (`M`): x + mixer(norm(x)), parameters `decoder.layers.<i>.norm.weight` and
  `decoder.layers.<i>.mixer.*` (Megatron's `MambaLayer` names);
- `AttentionLayer` (`*`): x + self_attention(input_layernorm(x));
- `MLPLayer` (`-`): x + mlp(pre_mlp_layernorm(x)).

Each takes the `(x, rope, attn_mask)` call of `TransformerLayer`, so the block's full-layer recompute
and FSDP's per-layer wrapping treat them alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from viaduct.models.common.attention import LayerKV, Rope, SelfAttention
from viaduct.models.common.mlp import MLP
from viaduct.models.common.norms import hidden_norm
from viaduct.models.common.transformer import LayerStack
from viaduct.models.gpt.model import GPTModel, _is_dtensor, draw_init_seed, part_seed
from viaduct.models.mamba.mixer import Mamba2Mixer, MambaCache
from viaduct.models.mamba.provider import ATTENTION, MAMBA
from viaduct.models.mamba.provider import MLP as MLP_SYMBOL

if TYPE_CHECKING:
    from viaduct.distributed.pipeline_split import StageSpec
    from viaduct.models.mamba.provider import HybridModelProvider


class MambaLayer(nn.Module):
    """x + mixer(norm(x)), dropout on the branch (Megatron's `MambaLayer`, its norm unfused)."""

    def __init__(
        self,
        cfg: HybridModelProvider,
        layer_number: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number  # 1-based, as in Megatron
        self.norm = hidden_norm(cfg, device=device, dtype=dtype)
        self.mixer = Mamba2Mixer(
            cfg.hidden_size,
            state_dim=cfg.mamba_state_dim,
            head_dim=cfg.mamba_head_dim,
            num_heads=cfg.mamba_heads(),
            num_groups=cfg.mamba_num_groups,
            chunk_size=cfg.mamba_chunk_size,
            bias=cfg.add_bias_linear,
            norm_eps=cfg.layernorm_epsilon,
            device=device,
            dtype=dtype,
        )
        self.hidden_dropout = cfg.hidden_dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: MambaCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`rope` and `attn_mask` are ignored: the scan is causal by construction and has no positions.
        (A padding mask has no meaning for a recurrence: padded tokens are excluded by the loss mask.)
        `kv_cache` / `cache_position`: generation, this layer's `MambaCache` (see `Mamba2Mixer.mix`)."""
        h = self.norm(x)
        # Only generation passes the cache: a tensor-parallel mixer's forward takes the input alone.
        h = self.mixer(h) if kv_cache is None else self.mixer(h, kv_cache, cache_position)
        return x + F.dropout(h, self.hidden_dropout, self.training)

    def new_cache(
        self, batch_size: int, valid: torch.Tensor, *, dtype: torch.dtype, device: torch.device
    ) -> MambaCache:
        """This layer's empty generation cache (see `viaduct.inference.KVCache`)."""
        return self.mixer.new_cache(batch_size, valid, dtype=dtype, device=device)


class AttentionLayer(nn.Module):
    """x + self_attention(input_layernorm(x)): the attention half of a `TransformerLayer`."""

    def __init__(
        self,
        cfg: HybridModelProvider,
        layer_number: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number
        selective = set(cfg.recompute_modules or ()) if cfg.recompute_granularity == "selective" else set()
        self.input_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        self.self_attention = SelfAttention(
            cfg, recompute_core_attention="core_attn" in selective, device=device, dtype=dtype
        )
        self.hidden_dropout = cfg.hidden_dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKV | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`kv_cache` / `cache_position`: generation with a KV cache (see `SelfAttention.forward`)."""
        h = self.input_layernorm(x)
        if kv_cache is not None:
            h = self.self_attention(h, rope, attn_mask, kv_cache, cache_position)
        else:
            h = self.self_attention(h, rope, attn_mask)
        return x + F.dropout(h, self.hidden_dropout, self.training)


class MLPLayer(nn.Module):
    """x + mlp(pre_mlp_layernorm(x)): the MLP half of a `TransformerLayer`."""

    def __init__(
        self,
        cfg: HybridModelProvider,
        layer_number: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.pre_mlp_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        self.mlp = MLP(cfg, device=device, dtype=dtype)
        self.hidden_dropout = cfg.hidden_dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Position-wise: `rope`, `attn_mask` and the generation arguments change nothing."""
        h = self.mlp(self.pre_mlp_layernorm(x))
        return x + F.dropout(h, self.hidden_dropout, self.training)

    def new_cache(
        self, batch_size: int, valid: torch.Tensor, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        """An MLP layer carries nothing between tokens."""
        return None


_LAYERS: dict[str, type[MambaLayer | AttentionLayer | MLPLayer]] = {
    MAMBA: MambaLayer,
    ATTENTION: AttentionLayer,
    MLP_SYMBOL: MLPLayer,
}


class MambaModel(GPTModel):
    """Embedding -> Mamba / attention / MLP layers -> final norm -> output layer (-> per-token loss).

    The `GPTModel` interface (`forward(input_ids, position_ids, attention_mask, labels)`, logits or
    per-token loss); built by `HybridModelProvider.provide()`, whole or as one pipeline stage (its
    layers keyed by their global index, as GPT's stages are).
    Generation (`viaduct.inference`) runs through GPT's cached forward: the generation cache gives each
    Mamba layer a `MambaCache` (its scan state and convolution inputs) where an attention layer gets
    keys and values.
    """

    def __init__(
        self,
        cfg: HybridModelProvider,
        vocab_size: int,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        layers: Sequence[int] | None = None,
        stage: StageSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # GPT's parts with an empty transformer stack (its final norm included), then our layers: the
        # given global indices (a pipeline stage's), else every layer of the pattern.
        super().__init__(
            cfg,
            vocab_size,
            pre_process=pre_process,
            post_process=post_process,
            layers=(),
            stage=stage,
            device=device,
            dtype=dtype,
        )
        pattern = cfg.layer_pattern()
        if layers is None:
            layers = stage.layers if stage is not None else range(len(pattern))
        self.decoder.layers = LayerStack(
            {str(i): _LAYERS[pattern[i]](cfg, i + 1, device=device, dtype=dtype) for i in layers}
        )

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT's initialization (`GPTModel.init_weights`), then each Mamba mixer's own: in_proj
        ~ N(0, init_method_std), out_proj ~ N(0, init_method_std / sqrt(2 x num_layers)) (a projection
        into the residual stream, like attention's linear_proj), and the convolution, dt_bias, A_log,
        D and gated norm as Mamba-2 does (`Mamba2Mixer.reset_parameters`). Each mixer draws from a
        generator seeded from `seed` and its name, so the weights do not depend on the build order."""
        if seed is None:
            seed = draw_init_seed()
        super().init_weights(seed)
        cfg = self.config
        std = cfg.init_method_std
        out_std = std / math.sqrt(2.0 * cfg.num_layers)
        for name, module in self.named_modules():
            if not isinstance(module, Mamba2Mixer):
                continue
            weight = module.in_proj.weight
            generator = None
            if not (weight.is_meta or _is_dtensor(weight)):
                generator = torch.Generator(device=weight.device).manual_seed(part_seed(seed, name))
            module.reset_parameters(generator, init_std=std, output_std=out_std)
