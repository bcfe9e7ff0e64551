"""`HybridModelProvider` / `MambaModelProvider`: configuration of a Mamba-2 or hybrid Mamba language model.

Megatron Bridge calls the family `HybridModelProvider` (newer) and `MambaModelProvider` (its v0.2.0
name); both are here, the second a subclass of the first that changes nothing, so a YAML file naming
either loads. The provider is a `GPTModelProvider`: the model it builds (`MambaModel`) is a decoder-only
language model with GPT's embedding, output layer and loss, so the training loop runs it with the GPT
forward step and data unchanged. Only the layer stack differs; `hybrid_layer_pattern` says what each
layer is, one symbol per layer:

- `M`: a Mamba-2 layer (pre-norm, `Mamba2Mixer`, residual);
- `*`: an attention layer (pre-norm, self-attention, residual; no MLP, as in Megatron's hybrid stack);
- `-`: an MLP layer (pre-norm, MLP, residual).

`|` between two symbols marks a pipeline stage boundary (`pipeline_layout`). Megatron's other
symbols (mixture of experts, multi-token prediction, ...) are refused by `finalize()` with the fix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from viaduct.config import DType, Problems
from viaduct.models.gpt.provider import GPTModelProvider
from viaduct.models.transformer_config import Normalization, PositionEmbeddingType

if TYPE_CHECKING:
    from viaduct.models.mamba.model import MambaModel

MAMBA, ATTENTION, MLP = "M", "*", "-"
"""The layer symbols of `hybrid_layer_pattern` that viaduct builds."""
LAYER_SYMBOLS = (MAMBA, ATTENTION, MLP)
STAGE_BOUNDARY = "|"
"""Marks a pipeline stage boundary between two layers of `hybrid_layer_pattern` (no layer itself)."""

# Megatron's other pattern symbols: what they mean here, and the fix.
_REFUSED_SYMBOLS: dict[str, tuple[str, str]] = {
    "E": ("mixture-of-experts layers are not supported yet", "replace 'E' by '-' (a dense MLP layer)"),
    "G": ("this layer type is not supported", "use only M (Mamba), * (attention) and - (MLP)"),
    "D": ("this layer type is not supported", "use only M (Mamba), * (attention) and - (MLP)"),
    "+": ("this layer type is not supported", "use only M (Mamba), * (attention) and - (MLP)"),
    "/": (
        "multi-token prediction layers are not supported",
        "remove the '/' and the layers after it from the pattern",
    ),
}


def _spread(layers: list[str], symbol: str, count: int, *, end_with_mamba: bool) -> None:
    """Turn `count` of the Mamba layers into `symbol`, evenly spaced: the Mamba layers that stay are
    cut into runs of equal (fractional) length, count + 1 of them (Mamba layers first and last) or,
    without `end_with_mamba`, count (the last run ends with `symbol`); each `symbol` goes where the
    running remainder of the current run drops under half a layer, so a run of 2.5 layers is 2 or 3
    layers long as rounding falls. (Megatron's placement, which this reproduces exactly.)"""
    if count <= 0:
        return
    mamba = [i for i, s in enumerate(layers) if s == MAMBA]
    run = (len(mamba) - count) / (count + 1 if end_with_mamba else count)
    left = run
    for i in mamba:
        if left < 0.5:
            layers[i] = symbol
            left += run
        else:
            left -= 1


def pattern_from_ratios(num_layers: int, attention_ratio: float, mlp_ratio: float) -> str:
    """The layers of a hybrid stack placed by its ratios, as Megatron places them:
    round(num_layers x attention_ratio) attention layers spread evenly with Mamba layers first and
    last, then round(num_layers x mlp_ratio) MLP layers spread evenly over the remaining Mamba
    layers, the last run ending with one; the rest stay Mamba layers.
    `pattern_from_ratios(8, 0.25, 0.25)` is "MM*-M*M-"."""
    layers = [MAMBA] * num_layers
    _spread(layers, ATTENTION, round(num_layers * attention_ratio), end_with_mamba=True)
    _spread(layers, MLP, round(num_layers * mlp_ratio), end_with_mamba=False)
    return "".join(layers)


def parse_layer_pattern(pattern: str, path: str = "hybrid_layer_pattern") -> tuple[str, Problems]:
    """The layer symbols of the pattern (without blanks and stage boundaries), and one problem per
    symbol it cannot hold (each symbol once, with its positions)."""
    p = Problems()
    clean = "".join(pattern.split())
    positions: dict[str, list[int]] = {}
    for i, ch in enumerate(clean):
        if ch not in LAYER_SYMBOLS and ch != STAGE_BOUNDARY:
            positions.setdefault(ch, []).append(i)
    for ch, where in positions.items():
        at = ", ".join(map(str, where[:8])) + (", ..." if len(where) > 8 else "")
        if ch in _REFUSED_SYMBOLS:
            why, fix = _REFUSED_SYMBOLS[ch]
            p.add(path, f"symbol {ch!r} (at {at}): {why}", pattern, fix=fix)
        else:
            p.add(
                path,
                f"unknown layer symbol {ch!r} (at {at})",
                pattern,
                fix="use one symbol per layer: M (Mamba), * (attention), - (MLP)",
            )
    layers = clean.replace(STAGE_BOUNDARY, "")
    if not layers:
        p.add(path, "is empty: it needs one symbol per layer", pattern, fix="use e.g. 'MMMM' or 'M*M-'")
    return layers, p


def pattern_stage_layers(pattern: str) -> list[int] | None:
    """The number of layers between the pattern's stage boundaries ('|'), in order; None without any
    ("MM*|M-M|MM" gives [3, 3, 2])."""
    clean = "".join(pattern.split())
    if STAGE_BOUNDARY not in clean:
        return None
    return [len(part) for part in clean.split(STAGE_BOUNDARY)]


@dataclass(kw_only=True)
class HybridModelProvider(GPTModelProvider):
    """A Mamba-2 or hybrid (Mamba, attention, MLP) decoder-only language model.

    Standalone use: `HybridModelProvider(hybrid_layer_pattern="M*M-", hidden_size=256,
    num_attention_heads=4, vocab_size=1000).finalize()`. Redeclared fields only change the defaults of
    `GPTModelProvider`'s (Megatron Bridge's values for this family).
    """

    _aliases_: ClassVar[tuple[str, ...]] = ("hybrid",)

    # ------------------------------------------------------------------ defaults that differ from GPT
    params_dtype: DType = DType("bfloat16")
    bf16: bool = True
    num_layers: int | None = None  # type: ignore[assignment]
    """Number of layers; unset means the length of hybrid_layer_pattern."""
    num_attention_heads: int = 1
    seq_length: int = 8192
    position_embedding_type: PositionEmbeddingType = "none"
    normalization: Normalization = "RMSNorm"
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    gated_linear_unit: bool = False
    share_embeddings_and_output_weights: bool = False

    # ------------------------------------------------------------------ Mamba
    mamba_state_dim: int = 128
    """Size of the SSM state of each head (d_state)."""
    mamba_head_dim: int = 64
    """Channels per Mamba head."""
    mamba_num_groups: int = 8
    """Groups of heads sharing the SSM's B and C projections (must divide the head count)."""
    mamba_num_heads: int | None = None
    """Mamba heads; unset means 2 x hidden_size / mamba_head_dim (Mamba-2's expand of 2)."""
    mamba_chunk_size: int = 128
    """Chunk length of the SSD scan (tokens per chunk of its quadratic form)."""
    hybrid_attention_ratio: float = 0.0
    """Share of attention layers, spread evenly among num_layers, when no pattern is given."""
    hybrid_mlp_ratio: float = 0.0
    """Share of MLP layers, spread evenly among the Mamba layers, when no pattern is given."""
    hybrid_layer_pattern: str | None = None
    """One symbol per layer: M Mamba, * attention, - MLP, | a pipeline stage boundary; unset: all Mamba."""
    hybrid_override_pattern: str | None = None
    """Deprecated name of hybrid_layer_pattern (moved there by finalize)."""

    # ------------------------------------------------------------------ derived views

    def layer_pattern(self) -> str:
        """The symbol of every layer (after `finalize()`): the pattern, or num_layers layers placed by
        the ratios (all Mamba layers when both are 0)."""
        if self.hybrid_layer_pattern is not None:
            return "".join(self.hybrid_layer_pattern.split()).replace(STAGE_BOUNDARY, "")
        return pattern_from_ratios(self.num_layers or 0, self.hybrid_attention_ratio, self.hybrid_mlp_ratio)

    def pipeline_layout(self) -> tuple[str | list[list[str]] | None, str]:
        """With stage boundaries ('|') in hybrid_layer_pattern, the layout they draw: the embedding on
        the first slice, the loss on the last, each slice the layers between two boundaries (slices
        go to the pipeline ranks in turn, as a layout's do); else `TransformerConfig`'s."""
        stages = pattern_stage_layers(self.hybrid_layer_pattern or "")
        if stages is None:
            return super().pipeline_layout()
        return "E" + "|".join("t" * n for n in stages) + "L", "hybrid_layer_pattern"

    def mamba_heads(self) -> int:
        """The number of Mamba heads each Mamba layer has."""
        if self.mamba_num_heads is not None:
            return self.mamba_num_heads
        return 2 * self.hidden_size // self.mamba_head_dim

    # ------------------------------------------------------------------ finalize

    def finalize(self) -> None:
        """Move the deprecated pattern name, then derive and check as `TransformerConfig.finalize`."""
        legacy, current = self.hybrid_override_pattern, self.hybrid_layer_pattern
        if legacy is not None and current is None:
            warnings.warn(
                "model.hybrid_override_pattern is deprecated: use model.hybrid_layer_pattern",
                DeprecationWarning,
                stacklevel=2,
            )
            self.hybrid_layer_pattern, self.hybrid_override_pattern = legacy, None
        super().finalize()

    def _derive_defaults(self, bad: set[str]) -> None:
        pattern = self.hybrid_layer_pattern
        if bad.isdisjoint(("num_layers", "hybrid_layer_pattern")) and self.num_layers is None and pattern:
            clean, problems = parse_layer_pattern(pattern)
            if not problems:
                self.derive("num_layers", len(clean), "= length of hybrid_layer_pattern", own=True)
        super()._derive_defaults(bad)

    def _check_architecture(self, p: Problems, bad: set[str]) -> None:
        own = Problems()
        self._check_mamba(own, bad)
        p.extend(own.items)
        # The base rules read num_layers as a number: skip them when it is missing or contradicted.
        skip = (
            {"num_layers"}
            if self.num_layers is None or "num_layers" in {q.path for q in own.items}
            else set()
        )
        super()._check_architecture(p, bad | skip)

    def _check_mamba(self, p: Problems, bad: set[str]) -> None:
        pattern, legacy = self.hybrid_layer_pattern, self.hybrid_override_pattern
        if legacy is not None and pattern is not None:
            p.add(
                "hybrid_override_pattern",
                "is the deprecated name of hybrid_layer_pattern, and both are set",
                legacy,
                fix="keep only model.hybrid_layer_pattern",
            )
        if pattern is not None and "hybrid_layer_pattern" not in bad:
            clean, problems = parse_layer_pattern(pattern)
            p.extend(problems.items)
            if not problems:
                self._warn_if_ratios_disagree(clean)
            n = self.num_layers
            if not problems and n is not None and "num_layers" not in bad and n != len(clean):
                p.add(
                    "num_layers",
                    f"disagrees with hybrid_layer_pattern, which has {len(clean)} layers",
                    n,
                    fix=f"set model.num_layers={len(clean)} or leave it unset (null)",
                )
        elif pattern is None and "num_layers" not in bad:
            self._check_ratios(p, bad)
            if self.num_layers is None:
                p.add(
                    "num_layers",
                    "must be set when hybrid_layer_pattern is unset (the layers are then placed by "
                    "hybrid_attention_ratio and hybrid_mlp_ratio; all Mamba layers when both are 0)",
                    None,
                    fix="set model.num_layers, or model.hybrid_layer_pattern (e.g. 'MMMM')",
                )
        for name in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_chunk_size"):
            value = getattr(self, name)
            if name not in bad and value < 1:
                p.add(name, "must be >= 1", value, fix=f"set model.{name} to a positive number")
        if "mamba_num_heads" not in bad and self.mamba_num_heads is not None and self.mamba_num_heads < 1:
            p.add(
                "mamba_num_heads", "must be >= 1", self.mamba_num_heads, fix="set it or leave it unset (null)"
            )
        sizes = ("hidden_size", "mamba_head_dim", "mamba_num_heads", "mamba_num_groups")
        if bad.isdisjoint(sizes) and min(self.hidden_size, self.mamba_head_dim, self.mamba_num_groups) >= 1:
            if self.mamba_num_heads is None and (2 * self.hidden_size) % self.mamba_head_dim:
                p.add(
                    "mamba_head_dim",
                    f"must divide 2 x hidden_size ({2 * self.hidden_size}) when mamba_num_heads is unset",
                    self.mamba_head_dim,
                    fix="change model.mamba_head_dim, or set model.mamba_num_heads",
                )
            elif (heads := self.mamba_heads()) >= 1 and heads % self.mamba_num_groups:
                p.add(
                    "mamba_num_groups",
                    f"must divide the number of Mamba heads ({heads})",
                    self.mamba_num_groups,
                    fix="set model.mamba_num_groups to a divisor of the head count",
                )

    def _warn_if_ratios_disagree(self, pattern: str) -> None:
        # As in Megatron, a pattern overrides the ratios; ratios that say otherwise are worth a word.
        for name, symbol in (("hybrid_attention_ratio", ATTENTION), ("hybrid_mlp_ratio", MLP)):
            ratio, actual = getattr(self, name), pattern.count(symbol) / max(len(pattern), 1)
            if ratio != 0.0 and abs(ratio - actual) > 1e-3:
                warnings.warn(
                    f"model.{name}={ratio} is ignored: hybrid_layer_pattern places the layers "
                    f"(its share of '{symbol}' layers is {actual:.3f})",
                    stacklevel=2,
                )

    def _check_ratios(self, p: Problems, bad: set[str]) -> None:
        """The ratios that place the layers when no pattern is given: shares in [0, 1], together at
        most 1."""
        names = ("hybrid_attention_ratio", "hybrid_mlp_ratio")
        ok = True
        for name in names:
            ratio = getattr(self, name)
            if name not in bad and not 0.0 <= ratio <= 1.0:
                ok = False
                p.add(
                    name,
                    "is a share of the layers, between 0 and 1",
                    ratio,
                    fix=f"set model.{name} in [0, 1]",
                )
        total = self.hybrid_attention_ratio + self.hybrid_mlp_ratio
        if ok and bad.isdisjoint(names) and total > 1.0:
            p.add(
                "hybrid_mlp_ratio",
                f"with hybrid_attention_ratio {self.hybrid_attention_ratio} the shares add up to {total}, "
                "more than all the layers",
                self.hybrid_mlp_ratio,
                fix="lower model.hybrid_attention_ratio or model.hybrid_mlp_ratio (their sum at most 1)",
            )

    def _check_parallelism(self, p: Problems, bad: set[str]) -> None:
        """Context parallelism trades each rank's tokens for whole B/C groups around the Mamba scan
        (`viaduct.distributed.mamba_context`): a tensor-parallel rank's groups must split evenly over
        the context-parallel ranks."""
        cp, tp = self.context_parallel_size, self.tensor_model_parallel_size
        inputs = {
            "context_parallel_size",
            "tensor_model_parallel_size",
            "hybrid_layer_pattern",
            "mamba_num_groups",
        }
        fine = inputs.isdisjoint(bad) and isinstance(cp, int) and isinstance(tp, int) and tp >= 1
        groups = self.mamba_num_groups
        if fine and cp > 1 and groups >= 1 and MAMBA in self.layer_pattern() and groups % (tp * cp):
            on = f" (tensor_model_parallel_size={tp} × context_parallel_size={cp})" if tp > 1 else ""
            p.add(
                "context_parallel_size",
                "Mamba layers trade the sequence for whole B/C groups under context parallelism, and "
                f"{groups} groups (model.mamba_num_groups) cannot be split evenly over {tp * cp} ranks{on}",
                cp,
                fix="choose sizes whose product divides mamba_num_groups",
            )
        super()._check_parallelism(p, bad)

    def _check_pipeline(self, p: Problems, bad: set[str], pp: int) -> None:
        """Stage boundaries in the pattern place the layers as a pipeline layout would: never both, and
        as many slices as a multiple of the pipeline ranks (they only apply with pipeline parallelism:
        without it the whole model is one stage, so a pattern trained with boundaries also loads in
        one process)."""
        pattern = self.hybrid_layer_pattern
        skip: set[str] = set()
        if self.num_layers is None:
            skip.add("num_layers")  # no pattern to count (a problem reported already)
        if pattern is not None and "hybrid_layer_pattern" not in bad:
            stages = pattern_stage_layers(pattern)
            if parse_layer_pattern(pattern)[1]:
                skip |= {"num_layers", "pipeline_model_parallel_layout"}  # its symbols are reported
            elif stages is not None:
                layout = self.pipeline_model_parallel_layout
                if layout is not None and "pipeline_model_parallel_layout" not in bad:
                    p.add(
                        "pipeline_model_parallel_layout",
                        "cannot be combined with stage boundaries ('|') in hybrid_layer_pattern: both "
                        "place the layers",
                        layout,
                        fix="unset model.pipeline_model_parallel_layout, or remove the '|' from the pattern",
                    )
                if pp > 1 and len(stages) % pp:
                    p.add(
                        "hybrid_layer_pattern",
                        f"its stage boundaries ('|') cut it into {len(stages)} slices, not a multiple of "
                        f"pipeline_model_parallel_size ({pp})",
                        pattern,
                        fix=f"mark {pp} × (virtual stages) slices with '|', or change "
                        "model.pipeline_model_parallel_size",
                    )
                    skip.add("pipeline_model_parallel_layout")
        super()._check_pipeline(p, bad | skip, pp)

    def _check_tensor_parallel(self, p: Problems, bad: set[str]) -> None:
        """Mamba layers are split by whole B/C groups; the attention and MLP rules apply only to a
        pattern that has such layers."""
        pattern = set(self.layer_pattern()) if "hybrid_layer_pattern" not in bad else set()
        unused = set()
        if ATTENTION not in pattern:
            unused |= {"num_attention_heads", "num_query_groups"}
        if MLP not in pattern:
            unused.add("ffn_hidden_size")
        super()._check_tensor_parallel(p, bad | unused)
        tp, groups = self.tensor_model_parallel_size, self.mamba_num_groups
        fine = {"tensor_model_parallel_size", "mamba_num_groups"}.isdisjoint(bad) and groups >= 1
        if fine and tp > 1 and MAMBA in pattern and groups % tp:
            p.add(
                "tensor_model_parallel_size",
                f"Mamba layers are split by whole B/C groups, and {groups} groups (model.mamba_num_groups) "
                f"cannot be split evenly over {tp} tensor-parallel ranks",
                tp,
                fix="choose a tensor_model_parallel_size that divides mamba_num_groups",
            )

    # ------------------------------------------------------------------ building

    def provide(
        self,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        vp_stage: int | None = None,
        *,
        pp_rank: int | None = None,
        device: Any = None,
        init_seed: int | None = None,
    ) -> MambaModel:
        """Finalize, then build the `MambaModel` (or one pipeline stage of it) as
        `GPTModelProvider.provide` does."""
        from viaduct.models.mamba.model import MambaModel

        model = super().provide(
            pre_process, post_process, vp_stage, pp_rank=pp_rank, device=device, init_seed=init_seed
        )
        assert isinstance(model, MambaModel)
        return model

    def _model_class(self) -> type[MambaModel]:
        from viaduct.models.mamba.model import MambaModel

        return MambaModel


@dataclass(kw_only=True)
class MambaModelProvider(HybridModelProvider):
    """Megatron Bridge's v0.2.0 name of `HybridModelProvider`: the same configuration."""

    _aliases_: ClassVar[tuple[str, ...]] = ("mamba",)


# ---------------------------------------------------------------------- named sizes (Megatron Bridge's)


@dataclass(kw_only=True)
class MambaModelProvider130M(MambaModelProvider):
    """Mamba-2 130M: 24 Mamba layers, hidden 768, one group of B/C."""

    _aliases_: ClassVar[tuple[str, ...]] = ()

    hybrid_layer_pattern: str | None = MAMBA * 24
    num_layers: int | None = 24  # type: ignore[assignment]
    seq_length: int = 2048
    hidden_size: int = 768
    mamba_num_groups: int = 1
    ffn_hidden_size: int | None = 768
    make_vocab_size_divisible_by: int = 16


@dataclass(kw_only=True)
class MambaModelProvider370M(MambaModelProvider):
    """Mamba-2 370M: 48 Mamba layers, hidden 1024, one group of B/C."""

    _aliases_: ClassVar[tuple[str, ...]] = ()

    hybrid_layer_pattern: str | None = MAMBA * 48
    num_layers: int | None = 48  # type: ignore[assignment]
    seq_length: int = 2048
    hidden_size: int = 1024
    mamba_num_groups: int = 1
    ffn_hidden_size: int | None = 1024
    make_vocab_size_divisible_by: int = 16


@dataclass(kw_only=True)
class MambaModelProvider780M(MambaModelProvider):
    """Mamba-2 780M: 48 Mamba layers, hidden 1536, one group of B/C."""

    _aliases_: ClassVar[tuple[str, ...]] = ()

    hybrid_layer_pattern: str | None = MAMBA * 48
    num_layers: int | None = 48  # type: ignore[assignment]
    seq_length: int = 2048
    hidden_size: int = 1536
    mamba_num_groups: int = 1
    ffn_hidden_size: int | None = 1536
    make_vocab_size_divisible_by: int = 16


@dataclass(kw_only=True)
class MambaModelProvider1P3B(MambaModelProvider):
    """Mamba-2 1.3B: 48 Mamba layers, hidden 2048, one group of B/C."""

    _aliases_: ClassVar[tuple[str, ...]] = ()

    hybrid_layer_pattern: str | None = MAMBA * 48
    num_layers: int | None = 48  # type: ignore[assignment]
    seq_length: int = 2048
    hidden_size: int = 2048
    mamba_num_groups: int = 1
    ffn_hidden_size: int | None = 2048
    make_vocab_size_divisible_by: int = 16


@dataclass(kw_only=True)
class MambaModelProvider2P7B(MambaModelProvider):
    """Mamba-2 2.7B: 64 Mamba layers, hidden 2560, one group of B/C."""

    _aliases_: ClassVar[tuple[str, ...]] = ()

    hybrid_layer_pattern: str | None = MAMBA * 64
    num_layers: int | None = 64  # type: ignore[assignment]
    seq_length: int = 2048
    hidden_size: int = 2560
    mamba_num_groups: int = 1
    ffn_hidden_size: int | None = 2560
    make_vocab_size_divisible_by: int = 16


@dataclass(kw_only=True)
class NVIDIAMambaModelProvider8B(MambaModelProvider):
    """NVIDIA's 8B pure Mamba-2 research model: 56 Mamba layers, hidden 4096, 8 groups."""

    _aliases_: ClassVar[tuple[str, ...]] = ()

    hybrid_layer_pattern: str | None = MAMBA * 56
    num_attention_heads: int = 32
    num_layers: int | None = 56  # type: ignore[assignment]
    seq_length: int = 4096
    hidden_size: int = 4096
    mamba_num_groups: int = 8
    ffn_hidden_size: int | None = 4096
    make_vocab_size_divisible_by: int = 128


@dataclass(kw_only=True)
class NVIDIAMambaHybridModelProvider8B(MambaModelProvider):
    """NVIDIA's 8B hybrid research model (Mamba-2-Hybrid): 24 Mamba, 4 attention (GQA, 8 groups) and
    28 MLP layers, hidden 4096."""

    _aliases_: ClassVar[tuple[str, ...]] = ()

    hybrid_layer_pattern: str | None = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
    num_layers: int | None = 56  # type: ignore[assignment]
    seq_length: int = 4096
    hidden_size: int = 4096
    mamba_num_groups: int = 8
    ffn_hidden_size: int | None = 16384
    num_attention_heads: int = 32
    num_query_groups: int | None = 8
    make_vocab_size_divisible_by: int = 128
