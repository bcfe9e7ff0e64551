"""Pipeline stages built by `GPTModelProvider.provide(pp_rank=..., vp_stage=...)`, on the CPU in one
process: which parameters each stage holds (named by global layer index), that the stages chained by
hand compute exactly what the whole model computes (loss and gradients), the tied token table's copy on
the last stage, initialization that does not depend on the layout, and the errors for a wrong stage."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from tests.models.test_gpt_model import SEQ, VOCAB
from tests.models.test_gpt_model import provider as small_provider
from torch import nn

from viaduct.config import ConfigError
from viaduct.models import GPTModelProvider
from viaduct.models.common.transformer import LayerStack, TransformerBlock, TransformerLayer
from viaduct.models.gpt.model import GPTModel


def provider(**kw: object) -> GPTModelProvider:
    """The small model of the GPT model tests, 4 layers deep (enough for 4 stages)."""
    return small_provider(**{"num_layers": 4, **kw})


def finalized(**kw: object) -> GPTModelProvider:
    p = provider(**kw)
    p.finalize()
    return p


def tokens(b: int = 2, s: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def whole_model(seed: int, **kw: object) -> GPTModel:
    return provider(**kw).provide(init_seed=seed)


def stages(seed: int, **kw: object) -> list[GPTModel]:
    """Every stage of the pipeline `kw` describes, in the order data flows through them."""
    p = finalized(**kw)  # a layout's slices set virtual_pipeline_model_parallel_size
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    chunks = [None] if vpp is None else list(range(vpp))
    built = [p.provide(pp_rank=r, vp_stage=v, init_seed=seed) for v in chunks for r in range(pp)]
    return sorted(built, key=lambda m: m.stage.stage_index)  # type: ignore[union-attr]


def run_chain(models: list[GPTModel], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Stage by stage, as the pipeline runtime would (without sending anything anywhere)."""
    out: torch.Tensor | None = None
    for m in models:
        if out is not None:
            m.set_input_tensor(out)
        out = m(x, labels=y) if m.post_process else m(x)
    assert out is not None
    return out


def layer_indices(model: GPTModel) -> set[int]:
    return {
        int(name.split(".")[2]) for name, _ in model.named_parameters() if name.startswith("decoder.layers.")
    }


# Each layout: its config, then the global layers of each stage in pipeline order.
LAYOUTS = {
    "pp2": (dict(pipeline_model_parallel_size=2), [[0, 1], [2, 3]]),
    "pp2-vpp2": (
        dict(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        [[0, 1], [2, 3], [4, 5], [6, 7]],
    ),
    "pp3-uneven": (
        dict(
            num_layers=6,
            pipeline_model_parallel_size=3,
            num_layers_in_first_pipeline_stage=1,
            num_layers_in_last_pipeline_stage=2,
        ),
        [[0], [1, 2, 3], [4, 5]],
    ),
    # The embedding and the loss on slices of their own (no layers there); 4 slices over 2 ranks make
    # 2 virtual stages.
    "pp2-layout-empty-ends": (
        dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="E|tt|tt|L"),
        [[], [0, 1], [2, 3], []],
    ),
}
VARIANTS = {
    "tied-learned": dict(share_embeddings_and_output_weights=True),
    "untied-rope": dict(share_embeddings_and_output_weights=False, position_embedding_type="rope"),
    "tied-rope-recompute": dict(
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        recompute_granularity="full",
        recompute_method="uniform",
        recompute_num_layers=1,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stages_hold_their_layers_and_compose_to_the_whole_model(layout: str, variant: str) -> None:
    layout_kw, expected_layers = LAYOUTS[layout]
    kw = {**layout_kw, **VARIANTS[variant]}
    tied = bool(kw["share_embeddings_and_output_weights"])
    whole_kw = {k: v for k, v in kw.items() if "pipeline" not in k}
    whole = whole_model(5, **whole_kw)
    models = stages(5, **kw)
    assert [list(m.stage.layers) for m in models] == expected_layers  # type: ignore[union-attr]

    # What each stage holds, by name: its own layers under their global index, the embedding only on the
    # first, the final norm and output only on the last (the tied table's copy there).
    whole_params = dict(whole.named_parameters())
    for i, m in enumerate(models):
        first, last = i == 0, i == len(models) - 1
        assert (m.pre_process, m.post_process) == (first, last)
        assert layer_indices(m) == set(expected_layers[i])
        assert m.decoder.layers.global_indices == tuple(expected_layers[i])
        assert [layer.layer_number for layer in m.decoder.layers] == [g + 1 for g in expected_layers[i]]
        names = {n for n, _ in m.named_parameters()}
        assert ("embedding.word_embeddings.weight" in names) == (first or (last and tied))
        assert any(n.startswith("embedding.position_embeddings") for n in names) == (
            first and kw.get("position_embedding_type") is None
        )
        assert any(n.startswith("decoder.final_layernorm") for n in names) == last
        assert ("output_layer.weight" in names) == (last and not tied)
        assert (m.tied_output_weight() is not None) == (last and tied)
        # Built with the same init_seed, every weight equals the whole model's of the same name.
        for name, p in m.named_parameters():
            assert torch.equal(p, whole_params[name]), name
    assert set().union(*(layer_indices(m) for m in models)) == set(range(int(kw.get("num_layers", 4))))

    x, y = tokens(), tokens(seed=2)
    upstream = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    loss_whole = whole(x, labels=y)
    loss_chain = run_chain(models, x, y)
    assert loss_chain.dtype == torch.float32 and torch.equal(loss_chain, loss_whole)
    (loss_whole * upstream).sum().backward()
    (loss_chain * upstream).sum().backward()

    table = "embedding.word_embeddings.weight"
    seen: set[str] = set()
    for m in models:
        for name, p in m.named_parameters():
            assert p.grad is not None, name
            if name == table and tied:
                continue  # two copies, compared as a sum below
            assert torch.equal(p.grad, whole_params[name].grad), name
            seen.add(name)
    if tied:
        summed = models[0].embedding.word_embeddings.weight.grad + models[-1].tied_output_weight().grad
        assert torch.equal(summed, whole_params[table].grad)
    assert seen | ({table} if tied else set()) == set(whole_params)


def test_tied_copy_on_the_last_stage() -> None:
    first, middle, last = stages(11, num_layers=3, pipeline_model_parallel_size=3)
    copy = last.tied_output_weight()
    assert isinstance(copy, nn.Parameter)
    assert dict(last.named_parameters())["embedding.word_embeddings.weight"] is copy
    assert last.output_weight() is copy and last.output_layer is None
    assert last.embedding.position_embeddings is None  # never used for input
    assert torch.equal(copy, first.embedding.word_embeddings.weight)
    assert copy.data_ptr() != first.embedding.word_embeddings.weight.data_ptr()  # its own storage
    assert first.tied_output_weight() is None and middle.tied_output_weight() is None
    assert middle.embedding is None and middle.output_layer is None
    assert middle.decoder.final_layernorm is None

    # As on separate ranks (each stage's input cut from the previous one's graph): the last stage's
    # backward reaches its copy, through the output layer, and nothing of the first stage.
    x = tokens()
    hidden = first(x)
    middle.set_input_tensor(hidden.detach())
    hidden = middle(x)
    last.set_input_tensor(hidden.detach())
    last(x, labels=tokens(seed=2)).sum().backward()
    assert first.embedding.word_embeddings.weight.grad is None
    assert copy.grad is not None and copy.grad.abs().sum() > 0


def test_non_first_stage_reads_only_the_shape_of_input_ids() -> None:
    first, last = stages(3, pipeline_model_parallel_size=2, position_embedding_type="rope")
    x = tokens()
    hidden = first(x)
    last.set_input_tensor(hidden)
    expected = last(x)
    # Any tensor of the right shape will do (here one with no data at all).
    last.set_input_tensor(hidden)
    assert torch.equal(last(torch.empty(x.shape, dtype=torch.long, device="meta")), expected)
    assert hidden.shape == (2, 16, 64)
    with pytest.raises(ValueError, match="seq_length"):
        last(torch.empty(2, SEQ + 1, device="meta"))


def test_non_first_stage_needs_its_input_tensor() -> None:
    _, last = stages(3, pipeline_model_parallel_size=2)
    with pytest.raises(RuntimeError, match="set_input_tensor"):
        last(tokens())


# ---------------------------------------------------------------------------------------------- layers


def test_layer_stack_keys_are_global_and_indexing_is_positional() -> None:
    block = TransformerBlock(finalized(num_layers=6), layers=[2, 3, 4], device="meta")
    layers = block.layers
    assert isinstance(layers, LayerStack) and len(layers) == 3
    assert list(layers.keys()) == ["2", "3", "4"] and layers.global_indices == (2, 3, 4)
    assert all(isinstance(layer, TransformerLayer) for layer in layers)  # iterating yields the layers
    assert [layer.layer_number for layer in layers] == [3, 4, 5]
    assert layers[0] is layers["2"] and layers[-1] is layers["4"]
    assert list(layers[1:]) == [layers["3"], layers["4"]] and layers[1:].global_indices == (3, 4)
    assert {n.split(".")[0] for n, _ in block.named_parameters()} == {"layers", "final_layernorm"}
    assert {n.split(".")[1] for n, _ in block.named_parameters() if n.startswith("layers.")} == {
        "2",
        "3",
        "4",
    }
    # The whole model is unchanged: decoder.layers.0 ... decoder.layers.<n-1>.
    cfg = finalized()
    whole = TransformerBlock(cfg, device="meta")
    assert whole.layers.global_indices == (0, 1, 2, 3)
    for bad in ([4], [1, 1], [2, 1], [-1]):
        with pytest.raises(ValueError, match="layers must be increasing"):
            TransformerBlock(cfg, layers=bad, device="meta")


def test_empty_stage_passes_the_hidden_states_through() -> None:
    block = TransformerBlock(finalized(), layers=[], post_process=False, device="cpu")
    x = torch.randn(2, 4, 64)
    assert len(block.layers) == 0 and torch.equal(block(x), x)


# ------------------------------------------------------------------------------------------ initialization


def test_init_seed_reproduces_and_the_global_seed_decides_otherwise() -> None:
    p = provider()
    a, b, c = p.provide(init_seed=7), p.provide(init_seed=7), p.provide(init_seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["decoder.layers.0.mlp.linear_fc1.weight"], sc["decoder.layers.0.mlp.linear_fc1.weight"]
    )

    # Without init_seed: two calls in a row differ, and the same torch seed gives the same weights.
    torch.manual_seed(0)
    d, e = p.provide().state_dict(), p.provide().state_dict()
    torch.manual_seed(0)
    f = p.provide().state_dict()
    key = "embedding.word_embeddings.weight"
    assert not torch.equal(d[key], e[key])
    assert all(torch.equal(d[k], f[k]) for k in d)


def test_each_part_draws_from_its_own_generator() -> None:
    # Same seed, different models around a part: the part's values do not change (here the layers and
    # the table are the same whether the output layer is tied or not, and whatever comes before them).
    tied = provider(share_embeddings_and_output_weights=True).provide(init_seed=4)
    untied = provider(share_embeddings_and_output_weights=False).provide(init_seed=4)
    for name, p in tied.named_parameters():
        assert torch.equal(p, dict(untied.named_parameters())[name]), name
    # Different parts of one model do not repeat each other's draws.
    w = tied.state_dict()
    assert not torch.equal(
        w["decoder.layers.0.mlp.linear_fc1.weight"], w["decoder.layers.1.mlp.linear_fc1.weight"]
    )
    # Initializing again with the same seed gives the same weights, in place.
    before = {k: v.clone() for k, v in w.items()}
    with torch.no_grad():
        for p in tied.parameters():
            p.zero_()
    tied.init_weights(4)
    assert all(torch.equal(before[k], v) for k, v in tied.state_dict().items())


@pytest.mark.filterwarnings("ignore:DTensor random operators")
def test_sharded_parameters_fall_back_to_the_global_generator(tmp_path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    plain = provider().provide(init_seed=9)
    model = provider().provide(init_seed=1)
    # A real one-process gloo group: linear_fc1 of layer 0 becomes a DTensor, as tensor parallelism makes it.
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mlp = model.decoder.layers[0].mlp
        parallelize_module(mlp, init_device_mesh("cpu", (1,)), {"linear_fc1": ColwiseParallel()})
        assert isinstance(mlp.linear_fc1.weight, DTensor)
        model.init_weights(9)
        sharded = mlp.linear_fc1.weight.full_tensor()
        assert (
            abs(float(sharded.detach().std()) / 0.02 - 1) < 0.1
            and (mlp.linear_fc1.bias.full_tensor() == 0).all()
        )
        # The other parts keep their own generators (within layer 0 the draws shift: fc1 took none).
        ref = dict(plain.named_parameters())
        for name, p in model.named_parameters():
            if not name.startswith("decoder.layers.0."):
                assert torch.equal(p, ref[name]), name
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ errors


def test_provide_errors_name_the_stage_arguments() -> None:
    pp2 = provider(pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match=r"pp_rank: is required .*fix: call provide\(pp_rank=r\)"):
        pp2.provide()
    for bad in (2, -1):
        with pytest.raises(ConfigError, match=r"pp_rank: must be a pipeline rank in \[0, 2\)"):
            pp2.provide(pp_rank=bad)
    with pytest.raises(
        ConfigError, match="vp_stage: without virtual pipeline parallelism each rank holds one"
    ):
        pp2.provide(pp_rank=0, vp_stage=1)
    assert pp2.provide(pp_rank=1, vp_stage=0).stage == pp2.provide(pp_rank=1).stage  # its only chunk

    vpp = provider(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match="vp_stage: is required"):
        vpp.provide(pp_rank=0)
    with pytest.raises(ConfigError, match=r"vp_stage: must be a model chunk in \[0, 2\)") as info:
        vpp.provide(pp_rank=5, vp_stage=2)
    assert "pp_rank" in str(info.value)  # every problem at once

    one = provider()
    with pytest.raises(ConfigError, match="pp_rank: without pipeline parallelism"):
        one.provide(pp_rank=1)
    with pytest.raises(ConfigError, match="vp_stage: without virtual pipeline parallelism"):
        one.provide(vp_stage=1)
    assert one.provide(pp_rank=0).stage is None  # the whole model
