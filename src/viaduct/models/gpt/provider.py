"""`GPTModelProvider`: configuration of a decoder-only (GPT-style) language model, and
`LlamaStyleProvider`: the Llama architecture that the Llama, Mistral and Qwen families share."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from viaduct.config import ConfigError, DType, FunctionRef, Problem, unsupported
from viaduct.config.types import torch_dtype
from viaduct.models.provider import ModelProvider
from viaduct.models.transformer_config import Normalization, PositionEmbeddingType

if TYPE_CHECKING:
    from viaduct.distributed.pipeline_split import StageSpec
    from viaduct.models.gpt.model import GPTModel


@dataclass(kw_only=True)
class GPTModelProvider(ModelProvider):
    """A GPT-style decoder-only model: its architecture, precision and parallel sizes.

    Standalone use: `GPTModelProvider(num_layers=24, hidden_size=2048, num_attention_heads=16,
    vocab_size=50000, seq_length=2048).finalize()`.
    """

    # Declared with the base's type: mypy would infer a one-name tuple that subclasses with two
    # names could not override.
    _aliases_: ClassVar[tuple[str, ...]] = ("gpt",)

    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the input embedding."""
    parallel_output: bool = True
    """Keep the logits split over tensor-parallel ranks for the loss (no gather)."""
    fp16_lm_cross_entropy: bool = False
    """Unfused loss only: cross entropy in the logits' half precision, not float32."""
    logit_dtype: DType | None = None
    """Dtype of the output logits; unset means the compute dtype."""
    scatter_embedding_sequence_parallel: bool = True
    """Scatter the embedding output along the sequence when sequence_parallel is on."""
    mtp_num_layers: int | None = unsupported("multi-token prediction", default=None)
    """Number of multi-token-prediction layers."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the multi-token-prediction loss (only with mtp_num_layers)."""
    hf_model_id: str | None = None
    """Hugging Face model id this configuration comes from (for export and tokenizer defaults)."""
    hf_model_revision: str | None = None
    """Revision (branch, tag or commit) of hf_model_id."""

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
    ) -> GPTModel:
        """Finalize, then build the model (or one pipeline stage of it) as a plain `nn.Module` in this
        process (no distributed setup).

        Without pipeline parallelism: the whole model. With pipeline_model_parallel_size > 1: the stage
        of pipeline rank `pp_rank` (required) and, with virtual_pipeline_model_parallel_size, of model
        chunk `vp_stage` (required then): only its layers, named by their global index
        (`decoder.layers.<i>...`), as `viaduct.distributed.pipeline_split.stage_of` splits them; the
        model's `stage` records it. `pre_process` (embedding) and `post_process` (final norm, output
        layer) default to the stage's, or True for the whole model.

        Weights are created in params_dtype on `device`: by default torch's current default device
        (so `with torch.device("cuda"): provider.provide()` builds on the GPU), the CPU with
        use_cpu_initialization, or `meta` with init_model_with_meta_device (call
        `model.to_empty(device=...)` and `model.init_weights()` afterwards). perform_initialization
        false leaves the weights uninitialized (they are about to be loaded). Initialization draws
        from generators seeded by `init_seed` and each part's name (see `GPTModel.init_weights`), so a
        stage holds exactly the weights of the same layers in the whole model built with the same
        `init_seed`; unset, one seed is drawn from torch's global generator for this call.
        """
        import torch

        self.finalize()
        stage = self._pipeline_stage(pp_rank, vp_stage)
        if pre_process is None:
            pre_process = stage.pre_process if stage is not None else True
        if post_process is None:
            post_process = stage.post_process if stage is not None else True
        vocab = self.padded_vocab_size()
        if device is None:
            if self.init_model_with_meta_device:
                device = "meta"
            elif self.use_cpu_initialization:
                device = "cpu"
            else:
                device = torch.get_default_device()
        device = torch.device(device)
        # Build on meta (no memory, no throwaway init), then allocate and initialize once.
        model = self._model_class()(
            self,
            vocab,
            pre_process=pre_process,
            post_process=post_process,
            layers=stage.layers if stage is not None else None,
            stage=stage,
            device="meta",
            dtype=torch_dtype(self.params_dtype),
        )
        if device.type != "meta":
            model.to_empty(device=device)
            if self.perform_initialization:
                model.init_weights(init_seed)
            elif model.rotary is not None:
                model.rotary.reset_parameters()
        return model

    def _model_class(self) -> type[GPTModel]:
        """The model `provide` builds (a family with other layers builds a subclass)."""
        from viaduct.models.gpt.model import GPTModel

        return GPTModel

    def _pipeline_stage(self, pp_rank: int | None, vp_stage: int | None) -> StageSpec | None:
        """The stage `provide(pp_rank=..., vp_stage=...)` builds (None: the whole model), after
        checking both against the pipeline sizes."""
        from viaduct.distributed.pipeline_split import num_virtual_stages, stage_of

        pp = self.pipeline_model_parallel_size
        # Chunks per rank: virtual_pipeline_model_parallel_size, or what a layout implies (else 1).
        vpp = num_virtual_stages(self)
        problems: list[Problem] = []
        if pp == 1:
            if pp_rank not in (None, 0) or isinstance(pp_rank, bool):
                problems.append(
                    Problem(
                        "pp_rank",
                        "without pipeline parallelism (pipeline_model_parallel_size = 1) the only "
                        "pipeline rank is 0",
                        pp_rank,
                        fix="call provide() without pp_rank",
                    )
                )
        elif pp_rank is None:
            problems.append(
                Problem(
                    "pp_rank",
                    f"is required with pipeline_model_parallel_size = {pp}: it says which stage to build",
                    pp_rank,
                    fix=f"call provide(pp_rank=r) with 0 <= r < {pp}",
                )
            )
        elif isinstance(pp_rank, bool) or not isinstance(pp_rank, int) or not 0 <= pp_rank < pp:
            problems.append(
                Problem(
                    "pp_rank",
                    f"must be a pipeline rank in [0, {pp}) (pipeline_model_parallel_size = {pp})",
                    pp_rank,
                    fix=f"call provide(pp_rank=r) with 0 <= r < {pp}",
                )
            )
        if vp_stage is None:
            if vpp > 1:
                problems.append(
                    Problem(
                        "vp_stage",
                        f"is required with {vpp} virtual pipeline stages per rank "
                        "(virtual_pipeline_model_parallel_size, or the layout's slices): it says which of "
                        "the rank's model chunks to build",
                        vp_stage,
                        fix=f"call provide(pp_rank=r, vp_stage=v) once for each 0 <= v < {vpp}",
                    )
                )
        elif isinstance(vp_stage, bool) or not isinstance(vp_stage, int) or not 0 <= vp_stage < vpp:
            why = (
                f"must be a model chunk in [0, {vpp}) ({vpp} virtual pipeline stages per rank)"
                if vpp > 1
                else "without virtual pipeline parallelism each rank holds one model chunk, 0"
            )
            problems.append(
                Problem(
                    "vp_stage",
                    why,
                    vp_stage,
                    fix=f"call provide(pp_rank=r, vp_stage=v) with 0 <= v < {vpp}"
                    if vpp > 1
                    else "call provide() without vp_stage",
                )
            )
        if problems:
            raise ConfigError(problems, header="provide(): cannot build the pipeline stage")
        if pp == 1:
            return None
        assert pp_rank is not None  # checked above
        return stage_of(self, pp_rank, vp_stage)


@dataclass(kw_only=True)
class LlamaStyleProvider(GPTModelProvider):
    """The Llama architecture: RMSNorm, SwiGLU, RoPE, no biases, no dropout, untied embeddings.

    The base of the Llama, Mistral and Qwen families, which change only what differs (norm epsilon,
    rotary base, a QKV bias, ...). Redeclared fields only change defaults; their help text is the
    `GPTModelProvider` field's.
    """

    _abstract_config_ = True

    normalization: Normalization = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation_func: FunctionRef = FunctionRef("silu")
    gated_linear_unit: bool = True
    position_embedding_type: PositionEmbeddingType = "rope"
    rotary_base: int = 10000
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    share_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02

    @staticmethod
    def architecture() -> dict[str, Any]:
        """The values of the fields this class sets: the Llama architecture as keyword arguments, for a
        plain `GPTModelProvider` that keeps the generic `_target_` (`recipes.llama.llama_model`)."""
        fields = LlamaStyleProvider.spec().fields
        return {
            name: fields[name].default_value()
            for name in inspect.get_annotations(LlamaStyleProvider)
            if name in fields
        }
