"""Parallelism applied to a plain model from outside, in one fixed order (as torchtitan does):

1. tensor (and sequence) parallel: DTensor styles on the layers' linear layers, the vocabulary split
   over the tensor-parallel ranks for the embedding and the output layer and loss;
2. context parallel: attention over a sequence split across ranks;
3. activation recompute: already part of the model (its config says which parts);
4. `torch.compile`, per layer;
5. FSDP2 (`fully_shard`) per layer, then the root: sharded (or, with no_shard, replicated) data
   parallelism over the data-parallel and context-parallel ranks.

The model code knows nothing of this: it exposes two hooks (`SelfAttention.kernel`,
`GPTModel.vocab_output`) and otherwise sees plain tensors.
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from viaduct.config.types import torch_dtype
from viaduct.distributed.mamba_parallel import mamba_layer_plan
from viaduct.models.common.transformer import LayerStack
from viaduct.models.gpt.model import draw_init_seed
from viaduct.models.mamba.model import MambaLayer

if TYPE_CHECKING:
    from viaduct.distributed.mesh import ParallelMesh
    from viaduct.distributed.pipeline import Pipeline
    from viaduct.distributed.vocab_parallel import VocabParallelOutput
    from viaduct.models.gpt.model import GPTModel
    from viaduct.models.gpt.provider import GPTModelProvider
    from viaduct.training.config.container import ConfigContainer


class _SequenceGatheredOutput:
    """`GPTModel.vocab_output` under sequence parallelism: the final norm's output is split along the
    sequence, so it is gathered (backward: each rank keeps its slice) before the vocabulary-parallel
    output layer, which needs every token on every tensor-parallel rank."""

    def __init__(self, inner: VocabParallelOutput, tp_mesh: DeviceMesh) -> None:
        self.inner, self.tp_mesh = inner, tp_mesh

    def _gather(self, hidden: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden, DTensor):
            hidden = DTensor.from_local(hidden, self.tp_mesh, [Shard(1)], run_check=False)
        return hidden.full_tensor()

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(self._gather(hidden), weight)

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.inner.loss(self._gather(hidden), weight, labels)


def _distribute_own(module: nn.Module, placements: dict[str, list[Placement]], mesh: DeviceMesh) -> None:
    """Make `module`'s own parameters (not its children's) DTensors with the given placements."""
    for name, param in list(module.named_parameters(recurse=False)):
        if name in placements:
            dist = distribute_tensor(param.detach(), mesh, placements[name])
            module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))


class _AdaptedColwise(ColwiseParallel):
    """ColwiseParallel for a layer with a PEFT adapter: the base weight, B and DoRA's magnitude split
    by output rows like the base's (so a fused layer's parts stay together), A replicated; the
    adapter's output is then split like the base's."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        rows: list[Placement] = [Shard(0)]
        own = {
            "": {"weight": rows, "bias": rows},
            "adapter": {"weight_magnitude": rows},
            "adapter.linear_out": {"weight": rows},
        }
        _distribute_own(module, own.get(name, {}), device_mesh)  # the rest (A) is replicated


class _AdaptedRowwise(RowwiseParallel):
    """RowwiseParallel for a layer with a PEFT adapter: the base weight and A split by input columns,
    B, the bias and DoRA's magnitude replicated; the adapter's partial sums are reduced with the
    base's."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        cols: list[Placement] = [Shard(1)]
        own = {"": {"weight": cols}, "adapter.linear_in": {"weight": cols}}
        _distribute_own(module, own.get(name, {}), device_mesh)


def _layer_plan(layer: nn.Module, sp: bool) -> dict[str, ParallelStyle]:
    """Megatron's split of one transformer layer: QKV and fc1 column-parallel (heads / MLP units split),
    the projections back into the residual stream row-parallel (partial sums reduced; with sequence
    parallel reduce-scattered along the sequence, and the norms run on sequence shards). Layers with
    a PEFT adapter split it consistently with their base (`_AdaptedColwise`, `_AdaptedRowwise`)."""
    from viaduct.peft.adapters import AdaptedLinear

    seq = Shard(1) if sp else Replicate()

    def colwise(name: str) -> ParallelStyle:
        adapted = isinstance(layer.get_submodule(name), AdaptedLinear)
        return _AdaptedColwise() if adapted else ColwiseParallel()

    def rowwise(name: str) -> ParallelStyle:
        adapted = isinstance(layer.get_submodule(name), AdaptedLinear)
        return _AdaptedRowwise(output_layouts=seq) if adapted else RowwiseParallel(output_layouts=seq)

    plan: dict[str, ParallelStyle] = {}
    # A transformer layer has both halves; a hybrid model's attention or MLP layer one of them.
    attn = getattr(layer, "self_attention", None)
    if attn is not None:
        plan["self_attention.linear_qkv"] = colwise("self_attention.linear_qkv")
        plan["self_attention.linear_proj"] = rowwise("self_attention.linear_proj")
        if attn.q_layernorm is not None:
            # Per-head norms see only this rank's heads: as DTensors split along the head dimension,
            # their replicated weights get gradients summed over all heads.
            plan["self_attention.q_layernorm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attention.k_layernorm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if sp:
            plan["input_layernorm"] = SequenceParallel(use_local_output=True)
            plan["self_attention"] = PrepareModuleInput(
                input_layouts=(Shard(1), None, None),
                desired_input_layouts=(Replicate(), None, None),
                use_local_output=True,
            )
    if getattr(layer, "mlp", None) is not None:
        plan["mlp.linear_fc1"] = colwise("mlp.linear_fc1")
        plan["mlp.linear_fc2"] = rowwise("mlp.linear_fc2")
        if sp:
            plan["pre_mlp_layernorm"] = SequenceParallel(use_local_output=True)
            plan["mlp"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            )
    return plan


def embedding_plan(prefix: str, has_positions: bool, sp: bool) -> dict[str, ParallelStyle]:
    """The embedding module `prefix`'s split: its token table (`word_embeddings`) by vocabulary rows,
    the partial sums reduced; a learned position table (`position_embeddings`) likewise. Under
    sequence parallelism, without positions the token embedding's partial sums are reduce-scattered
    straight onto sequence shards; with them, reduced whole, added, then sliced (no communication)."""
    direct = sp and not has_positions
    plan: dict[str, ParallelStyle] = {
        f"{prefix}.word_embeddings": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1) if direct else Replicate()
        )
    }
    if has_positions:
        plan[f"{prefix}.position_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate()
        )
    if sp and not direct:
        plan[prefix] = _SliceSequence()
    return plan


def apply_tensor_parallel(model: GPTModel, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Split `model` over `tp_mesh` (see `_layer_plan`); the vocabulary is split too."""
    from viaduct.distributed.vocab_parallel import VocabParallelOutput

    sp = sequence_parallel
    plan: dict[str, ParallelStyle] = {}
    embedding = model.embedding
    if embedding is not None:
        plan |= embedding_plan("embedding", embedding.position_embeddings is not None, sp)
    if model.decoder.final_layernorm is not None and sp:
        plan["decoder.final_layernorm"] = SequenceParallel(use_local_output=True)
    parallelize_module(model, tp_mesh, plan)
    if embedding is not None:
        embedding.register_forward_hook(_wait_for_collective)
    for layer in model.decoder.layers:
        if isinstance(layer, MambaLayer):
            parallelize_module(layer, tp_mesh, mamba_layer_plan(sp))
        else:  # a transformer layer, or a hybrid model's attention or MLP layer
            parallelize_module(layer, tp_mesh, _layer_plan(layer, sp))
    if model.output_layer is not None:
        # Untied: the output weight is split by vocabulary rows, as a column-parallel layer's is. The
        # model reads the weight rather than calling the layer, so only the placement matters.
        parallelize_module(model, tp_mesh, {"output_layer": ColwiseParallel()})
    vocab = VocabParallelOutput(tp_mesh.get_group())
    model.vocab_output = _SequenceGatheredOutput(vocab, tp_mesh) if sp else vocab


def _wait_for_collective(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
    """The embedding's output is the result of an asynchronous all-reduce (or reduce-scatter), which
    enters the first layer. A layer compiled on its own unwraps such an input and loses its link to
    the autograd graph, so the embedding would get no gradient: hand the layers a plain tensor (an
    elementwise copy, which waits for the collective and keeps the gradient's path)."""
    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


class _SliceSequence(ParallelStyle):
    """Turn a module's replicated output into this rank's sequence shard (dim 1); backward gathers."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def slice_output(_mod: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            full = DTensor.from_local(output, device_mesh, [Replicate()], run_check=False)
            return full.redistribute(device_mesh, [Shard(1)]).to_local()

        module.register_forward_hook(slice_output)
        return module


def enable_async_tensor_parallel(tp_mesh: DeviceMesh, device: torch.device, *, compiled: bool) -> None:
    """`model.tp_comm_overlap`: PyTorch's asynchronous tensor parallelism. torch.compile's
    micro-pipeline pass splits each all-gather -> GEMM and GEMM -> reduce-scatter pair of sequence
    parallelism into chunks whose communication (over symmetric memory) overlaps the GEMMs."""
    from viaduct.config import ConfigError, Problem

    problems = []
    if device.type != "cuda":
        problems.append(
            Problem(
                "model.tp_comm_overlap",
                f"asynchronous tensor parallelism runs on CUDA GPUs only, and this run is on {device.type}",
                True,
                fix="set tp_comm_overlap=false on this machine",
            )
        )
    if not compiled:
        problems.append(
            Problem(
                "model.tp_comm_overlap",
                "asynchronous tensor parallelism is a torch.compile pass, and this run is not compiled",
                True,
                fix="set train.torch_compile=true, or tp_comm_overlap=false",
            )
        )
    if problems:
        raise ConfigError(problems)
    import torch._inductor.config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    inductor_config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def fsdp_policy(cfg: ConfigContainer) -> MixedPrecisionPolicy:
    """bf16/fp16 compute from float32 shards when params_dtype asks for it; gradients reduced in
    float32 with ddp.grad_reduce_in_fp32 (else in the compute dtype)."""
    compute = torch_dtype(cfg.model.params_dtype)
    param_dtype = None if compute == torch.float32 else compute
    reduce_dtype = torch.float32 if cfg.ddp.grad_reduce_in_fp32 or param_dtype is None else param_dtype
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(
    model: nn.Module,
    cfg: ConfigContainer,
    pmesh: ParallelMesh,
    *,
    sum_gradients: bool,
    root: nn.Module | None = None,
) -> None:
    """FSDP2 per transformer layer, then the root (embedding, final norm, output layer): `model`
    itself, or `root`, a module that holds it (a pipeline stage).

    `sum_gradients`: reduce by sum rather than mean (a per-token loss is divided by the step's
    token count afterwards)."""
    layout = pmesh.layout
    mesh = pmesh.fsdp_mesh
    policy = fsdp_policy(cfg)
    # The model's per-token losses are a view of the loss kernel's output; nothing modifies them in
    # place (the forward-step contract computes new tensors from them), so FSDP's warning is moot.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # Every layer stack in forward order: the decoder's (GPT, Mamba), or the encoder's then the
    # decoder's (T5).
    layers = [layer for stack in model.modules() if isinstance(stack, LayerStack) for layer in stack]
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=layout.reshard_after_forward)
    # The root's parameters (output layer) are needed again as soon as backward starts: keep them.
    root = model if root is None else root
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if cfg.ddp.overlap_param_gather or cfg.optimizer.overlap_param_gather:
        # Explicit prefetch: the next layer's all-gather is issued before this layer computes.
        for current, following in itertools.pairwise(layers):
            current.set_modules_to_forward_prefetch([following])  # type: ignore[operator]
            following.set_modules_to_backward_prefetch([current])  # type: ignore[operator]
    if sum_gradients:
        for module in fsdp_modules(root):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM: a factor of 1 needs no pre-multiplied reduction (which gloo lacks).
            module.set_force_sum_reduction_for_comms(True)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """Every `fully_shard`-ed module of `model` (the root first)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(model: nn.Module, sync: bool, *, reshard_after_backward: bool | None = None) -> None:
    """Whether the next backward reduce-scatters the gradients (False: they accumulate unsharded);
    optionally whether parameters are resharded after it."""
    for module in fsdp_modules(model):
        module.set_requires_gradient_sync(sync, recurse=False)
        if reshard_after_backward is not None:
            module.set_reshard_after_backward(reshard_after_backward, recurse=False)


def build_parallel_model(
    cfg: ConfigContainer,
    provider: GPTModelProvider,
    pmesh: ParallelMesh,
    device: torch.device,
    *,
    compile_layers: bool,
) -> GPTModel:
    """The model of `provider`, split and sharded as `pmesh` says, in the order of the module docstring.

    Parameters are kept in float32 (the shards are the optimizer's master weights; FSDP computes in
    params_dtype). With `model.init_model_with_meta_device` the model is built on the meta device and
    each rank materializes and initializes only its own shards (on accelerators); otherwise every rank
    builds the whole model from the seed (exactly the weights one process would have) and keeps its
    part.
    """
    on_meta = _init_on_meta(provider, device)
    seed = draw_init_seed()
    model = provider.provide(device="meta" if on_meta else device, init_seed=seed)
    adapter_seed = add_adapters(cfg, [model])
    parallelize_chunk(model, model, cfg, provider, pmesh, device, compile_layers=compile_layers)
    if on_meta:
        materialize(model, model, provider, device, seed, adapter_seed)
    return model


def add_adapters(cfg: ConfigContainer, chunks: list[nn.Module]) -> int | None:
    """`cfg.peft` applied to the model's chunks (base frozen, adapters trainable) before any
    parallelism, with one adapter seed drawn for them all (as one process draws it); returns that
    seed, or None without PEFT."""
    if cfg.peft is None:
        return None
    from viaduct.peft.transform import apply, draw_adapter_seed

    seed = draw_adapter_seed()
    # Validation matched the targets on the whole model; a pipeline rank may hold none of a target's.
    apply(cfg.peft._low_rank(), chunks, True, seed, whole=False)
    return seed


def _init_on_meta(provider: GPTModelProvider, device: torch.device) -> bool:
    # DTensor draws distinct random numbers for each shard only on accelerators (its RNG tracker is
    # CUDA-like); on a CPU every shard would repeat the same draws, so CPU runs build whole and shard.
    return provider.init_model_with_meta_device and device.type != "cpu"


def parallelize_chunk(
    model: GPTModel,
    root: nn.Module,
    cfg: ConfigContainer,
    provider: GPTModelProvider,
    pmesh: ParallelMesh,
    device: torch.device,
    *,
    compile_layers: bool,
) -> None:
    """Tensor and context parallelism, compile and FSDP on `model` (a whole model or one pipeline
    stage's), in that order; `root` is the module FSDP shards last (the model, or the pipeline stage
    module that holds it)."""
    from viaduct.models.compile import compile_model

    layout = pmesh.layout
    model.float()
    if cfg.peft is not None:
        # Frozen base weights have no optimizer, hence no float32 master: FSDP stores them in the
        # compute dtype; only the adapters are float32 shards.
        dtype = torch_dtype(cfg.model.params_dtype)
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    if layout.tp > 1:
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        apply_tensor_parallel(model, pmesh.tp_mesh, sequence_parallel=layout.sequence_parallel)
        # PyTorch's styles re-create some parameters (norms under sequence parallelism, replicated
        # leftovers) as new, trainable Parameters: a frozen base must stay frozen.
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        if provider.tp_comm_overlap:
            enable_async_tensor_parallel(pmesh.tp_mesh, device, compiled=compile_layers)
    if layout.cp > 1:
        from viaduct.distributed.context_parallel import apply_context_parallel

        apply_context_parallel(model, pmesh.cp_group)
    if compile_layers:
        compile_model(model, scope="layers")
    apply_fsdp(model, cfg, pmesh, sum_gradients=provider.calculate_per_token_loss, root=root)


def materialize(
    model: GPTModel,
    root: nn.Module,
    provider: GPTModelProvider,
    device: torch.device,
    seed: int,
    adapter_seed: int | None = None,
) -> None:
    """Allocate a model built on the meta device on `device`, through its FSDP root (which then points
    its shards at the new storage), and initialize it (or not, when its weights are about to be
    loaded); its adapters, if any, from `adapter_seed`."""
    root.to_empty(device=device)
    with torch.no_grad():
        if provider.perform_initialization:
            model.init_weights(seed)
        elif model.rotary is not None:
            model.rotary.reset_parameters()
        if adapter_seed is not None:
            from viaduct.peft.transform import init_adapters

            init_adapters(model, adapter_seed)  # init_weights re-initialized them as plain linears


def build_pipeline(
    cfg: ConfigContainer,
    provider: GPTModelProvider,
    pmesh: ParallelMesh,
    device: torch.device,
    *,
    compile_layers: bool,
) -> Pipeline:
    """This rank's pipeline stages (one per virtual stage), each split and sharded like a whole model
    would be, with weights equal to the same layers of a model built in one process."""
    from viaduct.distributed.pipeline import Pipeline, StageModule
    from viaduct.distributed.pipeline_split import effective_schedule, stage_of

    layout = pmesh.layout
    on_meta = _init_on_meta(provider, device)
    seed = draw_init_seed()  # one draw, as a whole model takes: the same weights whatever the layout
    pipeline_dtype = torch_dtype(provider.pipeline_dtype or provider.params_dtype)
    chunks = [
        provider.provide(
            vp_stage=vp_stage,
            pp_rank=pmesh.pp_rank,
            device="meta" if on_meta else device,
            init_seed=seed,
        )
        for vp_stage in range(layout.vpp)
    ]
    adapter_seed = add_adapters(cfg, list(chunks))
    modules = []
    for vp_stage, chunk in enumerate(chunks):
        module = StageModule(chunk, stage_of(provider, pmesh.pp_rank, vp_stage), pipeline_dtype)
        parallelize_chunk(chunk, module, cfg, provider, pmesh, device, compile_layers=compile_layers)
        if on_meta:
            materialize(chunk, module, provider, device, seed, adapter_seed)
        modules.append(module)
    seq = provider.seq_length // layout.cp
    hidden_seq = seq // layout.tp if layout.sequence_parallel else seq
    pipeline = Pipeline(
        modules,
        pmesh,
        effective_schedule(provider),
        device,
        activation_shape=lambda mbs: (mbs, hidden_seq, provider.hidden_size),
        loss_shape=lambda mbs: (mbs, seq),
    )
    pipeline.sync_tied_weights()
    return pipeline
