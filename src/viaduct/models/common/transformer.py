"""A pre-norm transformer layer and the stack of them, with activation recompute."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from viaduct.models.common.attention import LayerKV, Rope, SelfAttention
from viaduct.models.common.mlp import MLP
from viaduct.models.common.norms import Norm, hidden_norm

if TYPE_CHECKING:
    from viaduct.models.transformer_config import TransformerConfig


class LayerState(Protocol):
    """A layer's generation state other than keys and values (a Mamba layer's scan state and
    convolution inputs): tensors it updates in place, token after token."""

    @property
    def nbytes(self) -> int:
        """Memory its tensors take."""
        ...


LayerCache = LayerKV | LayerState | None
"""What one layer carries between generation steps: an attention layer's keys and values, another
layer's own state, or nothing (an MLP layer)."""


def _maybe_checkpoint(
    on: bool, fn: Callable[..., torch.Tensor], *args: torch.Tensor | Rope | None
) -> torch.Tensor:
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TransformerLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); dropout on each branch (Megatron's `TransformerLayer`).

    Selective recompute (`recompute_modules`) re-runs the named parts in the backward pass instead of
    keeping their activations: core_attn (the attention kernel; the fused kernels keep nothing
    beyond q, k, v and the output, so this frees the score matrices of the unfused path), mlp.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        layer_number: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number  # 1-based, as in Megatron
        selective = set(cfg.recompute_modules or ()) if cfg.recompute_granularity == "selective" else set()

        self.input_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        self.self_attention = SelfAttention(
            cfg, recompute_core_attention="core_attn" in selective, device=device, dtype=dtype
        )
        self.pre_mlp_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        self.mlp = MLP(cfg, device=device, dtype=dtype)
        self.hidden_dropout = cfg.hidden_dropout
        self.residual_post_norm = cfg.apply_residual_connection_post_layernorm
        self.recompute_mlp = "mlp" in selective

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
        residual = h if self.residual_post_norm else x
        if kv_cache is not None:
            h = self.self_attention(h, rope, attn_mask, kv_cache, cache_position)
        else:
            h = self.self_attention(h, rope, attn_mask)
        x = residual + F.dropout(h, self.hidden_dropout, self.training)
        h = self.pre_mlp_layernorm(x)
        residual = h if self.residual_post_norm else x
        h = _maybe_checkpoint(self.recompute_mlp, self.mlp, h)
        return residual + F.dropout(h, self.hidden_dropout, self.training)


class LayerStack(nn.ModuleDict):
    """The transformer layers one model (or one pipeline stage) holds, keyed by their global index.

    The keys are the layers' 0-based indices in the whole model (`str(i)`), so a parameter is named
    `decoder.layers.<global index>...` whichever pipeline stage holds it, and a checkpoint reshards
    across pipeline sizes by name. Otherwise it behaves like the `nn.ModuleList` it replaces: iterating
    yields the layers in order (not the keys), `len()` counts them, and an int index or a slice is
    *positional* (`layers[0]` is this stage's first layer). A string key is the global index:
    `layers["5"]` is global layer 5. `keys()`, `values()` and `items()` are the dict's.
    """

    @property
    def global_indices(self) -> tuple[int, ...]:
        """The 0-based indices in the whole model of the layers held here, in order."""
        return tuple(int(key) for key in self.keys())

    def __iter__(self) -> Iterator[nn.Module]:  # type: ignore[override]
        return iter(self.values())

    @overload
    def __getitem__(self, key: str | int) -> nn.Module: ...
    @overload
    def __getitem__(self, key: slice) -> LayerStack: ...
    def __getitem__(self, key: str | int | slice) -> nn.Module | LayerStack:
        if isinstance(key, str):
            return self._modules[key]
        items = list(self.items())
        if isinstance(key, slice):
            return LayerStack(dict(items[key]))
        return items[key][1]


class TransformerBlock(nn.Module):
    """The layers in order (then the final norm, with post_process), with full-layer recompute.

    `layers`: the 0-based global indices of the layers to build, increasing (a pipeline stage's);
    None builds all `num_layers`. They sit in a `LayerStack` keyed by global index and each keeps
    `layer_number` = global index + 1, as in the whole model.

    recompute_method "uniform": the layers are cut into chunks of recompute_num_layers and only each
    chunk's input is kept. "block": the first recompute_num_layers layers are recomputed one by one,
    the rest keep their activations (trades memory for speed more finely). Both count the layers this
    block holds, so with pipeline parallelism they apply per stage (as in Megatron).
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        *,
        layers: Sequence[int] | None = None,
        post_process: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        indices = tuple(range(cfg.num_layers)) if layers is None else tuple(layers)
        # A caller's bug (the pipeline split computes these), not a user setting.
        if any(not 0 <= i < cfg.num_layers for i in indices) or any(
            a >= b for a, b in itertools.pairwise(indices)
        ):
            raise ValueError(
                f"layers must be increasing indices in [0, {cfg.num_layers}) (num_layers), "
                f"got {list(indices)}"
            )
        self.layers = LayerStack(
            {str(i): TransformerLayer(cfg, i + 1, device=device, dtype=dtype) for i in indices}
        )
        self.final_layernorm: Norm | None = None
        if post_process:
            self.final_layernorm = hidden_norm(cfg, device=device, dtype=dtype)
        full = cfg.recompute_granularity == "full"
        self.recompute_method = cfg.recompute_method if full else None
        self.recompute_num_layers = cfg.recompute_num_layers or 0

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: Sequence[LayerCache] | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`kv_cache`: one `LayerCache` per layer held here, in order (generation; no recompute then)."""
        # A plain list: torch.compile unpacks a ModuleDict (subclass) into its keys, not its layers.
        layers = list(self.layers.values())
        if kv_cache is not None:
            for layer, kv in zip(layers, kv_cache, strict=True):
                x = layer(x, rope, attn_mask, kv, cache_position)
            return self.final_layernorm(x) if self.final_layernorm is not None else x
        n = self.recompute_num_layers
        if self.recompute_method == "uniform" and torch.is_grad_enabled():
            for start in range(0, len(layers), n):
                x = checkpoint(
                    _run_layers, layers[start : start + n], x, rope, attn_mask, use_reentrant=False
                )
        else:
            for i, layer in enumerate(layers):
                recompute = self.recompute_method == "block" and i < n
                x = _maybe_checkpoint(recompute, layer, x, rope, attn_mask)
        return self.final_layernorm(x) if self.final_layernorm is not None else x


def _run_layers(
    layers: Iterable[nn.Module], x: torch.Tensor, rope: Rope | None, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    for layer in layers:
        x = layer(x, rope, attn_mask)
    return x
