"""T5ModelProvider: Megatron Bridge's defaults, finalize() rules, the model provide() builds, YAML
(viaduct's and Bridge's `_target_`), the named sizes' parameter counts, and training one batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from viaduct.config import ConfigError, FunctionRef, apply_overrides
from viaduct.config.docstrings import field_docstrings
from viaduct.models import (
    ModelProvider,
    T5ModelProvider,
    T5ModelProvider3B,
    T5ModelProvider11B,
    T5ModelProvider220M,
)
from viaduct.models.t5 import T5Model, T5Spec, t5_num_parameters, t5_provider_num_parameters
from viaduct.recipes import tiny_gpt_pretrain_config

POSITION_TYPES = ("learned_absolute", "rope", "relative")

# megatron.bridge.models.t5_provider.T5ModelProvider's own field defaults.
BRIDGE_DEFAULTS: dict[str, object] = {
    "encoder_num_layers": None,
    "fp16_lm_cross_entropy": False,
    "parallel_output": True,
    "share_embeddings_and_output_weights": True,
    "make_vocab_size_divisible_by": 128,
    "position_embedding_type": "learned_absolute",
    "apply_rope_fusion": True,
    "max_position_embeddings": 512,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "rotary_percent": 1.0,
    "seq_len_interpolation_factor": None,
    "seq_length": 512,
    "seq_length_dec": 128,
    "encoder_pipeline_model_parallel_size": 0,
    "attention_softmax_in_fp32": False,
    "bias_activation_fusion": True,
    "masked_softmax_fusion": True,
    "persist_layer_norm": True,
    "bias_dropout_fusion": True,
    "deallocate_pipeline_outputs": True,
    "num_moe_experts": None,
    "recompute_num_layers": 1,
    "distribute_saved_activations": False,
    "enable_autocast": False,
    "vocab_size": None,
    "should_pad_vocab": False,
}


def tiny(**kw: object) -> T5ModelProvider:
    base: dict[str, object] = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        vocab_size=96,
        max_position_embeddings=64,
        seq_length=16,
        seq_length_dec=8,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    base.update(kw)
    return T5ModelProvider(**base)  # type: ignore[arg-type]


def problem_paths(err: pytest.ExceptionInfo[ConfigError]) -> set[str]:
    return {p.path for p in err.value.problems}


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_equal_megatron_bridge() -> None:
    provider = T5ModelProvider()
    for name, value in BRIDGE_DEFAULTS.items():
        assert getattr(provider, name) == value, name
    # The rest are Megatron Core TransformerConfig's, as for GPT: gelu, biases, LayerNorm.
    assert provider.activation_func == FunctionRef("gelu")
    assert provider.add_bias_linear and not provider.gated_linear_unit
    assert provider.normalization == "LayerNorm"
    assert T5ModelProvider.target() == "viaduct.models.t5.provider.T5ModelProvider"
    # Megatron's layer-spec field is left out as on GPT: loading Bridge YAML drops it with a note.
    assert "transformer_layer_spec" in T5ModelProvider.legacy_fields()


def test_every_field_has_a_docstring() -> None:
    for cls in (T5ModelProvider, T5ModelProvider220M, T5ModelProvider3B, T5ModelProvider11B):
        docs = field_docstrings(cls)
        missing = [n for n in cls.spec().public_names() if not docs.get(n)]
        assert not missing, (cls.__name__, missing)


def test_short_names_select_the_providers() -> None:
    for cls, alias in (
        (T5ModelProvider, "t5"),
        (T5ModelProvider220M, "t5_220m"),
        (T5ModelProvider3B, "t5_3b"),
        (T5ModelProvider11B, "t5_11b"),
    ):
        assert ModelProvider.variant(alias) is cls


# ---------------------------------------------------------------------------------------------- finalize


def test_finalize_reports_every_problem_at_once() -> None:
    provider = tiny(
        hidden_size=30,  # 4 heads do not divide it
        tensor_model_parallel_size=3,  # 4 heads do not split over 3 ranks
        context_parallel_size=2,
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=2,
        seq_length=100,  # > max_position_embeddings (64)
        seq_length_dec=65,
        encoder_num_layers=0,
        fp16_lm_cross_entropy=True,
        encoder_pipeline_model_parallel_size=1,
        qk_layernorm=True,
        num_query_groups=2,
        recompute_granularity="selective",
        recompute_modules=["core_attn", "layernorm"],
        activation_func="torch.nn.functional.softplus",  # allowed, but not one T5Model runs
    )
    with pytest.raises(ConfigError) as err:
        provider.finalize()
    paths = problem_paths(err)
    expected = {
        "num_attention_heads",
        "tensor_model_parallel_size",
        "context_parallel_size",
        "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size",
        "seq_length",
        "seq_length_dec",
        "encoder_num_layers",
        "fp16_lm_cross_entropy",
        "encoder_pipeline_model_parallel_size",
        "qk_layernorm",
        "num_query_groups",
        "recompute_modules",
        "activation_func",
    }
    assert expected <= paths, expected - paths
    messages = {p.path: p.message for p in err.value.problems}
    assert messages["pipeline_model_parallel_size"] == "T5's encoder pipeline split is not built yet"
    assert "not built for T5 models yet" in messages["context_parallel_size"]
    assert "cannot be split evenly over 3 tensor-parallel ranks" in messages["tensor_model_parallel_size"]
    assert "max_position_embeddings (64)" in messages["seq_length"]
    assert "named activation" in messages["activation_func"]
    for problem in err.value.problems:
        assert problem.fix, problem.path


def test_sequence_lengths_bound_only_learned_and_rotary_positions() -> None:
    for kind in ("learned_absolute", "rope"):
        with pytest.raises(ConfigError) as err:
            tiny(position_embedding_type=kind, seq_length_dec=65).finalize()
        assert problem_paths(err) == {"seq_length_dec"}
    tiny(position_embedding_type="relative", seq_length=1000, seq_length_dec=1000).finalize()
    tiny(seq_length=64, seq_length_dec=64).finalize()  # equal to the table size is fine


def test_relative_bucket_rules() -> None:
    with pytest.raises(ConfigError) as err:
        tiny(position_embedding_type="relative", relative_attention_num_buckets=2).finalize()
    assert problem_paths(err) == {"relative_attention_num_buckets"}
    with pytest.raises(ConfigError) as err:
        tiny(position_embedding_type="relative", relative_attention_max_distance=16).finalize()
    assert problem_paths(err) == {"relative_attention_max_distance"}
    # Only relative positions read them.
    tiny(relative_attention_num_buckets=2).finalize()


def test_unknown_position_type_is_a_type_problem() -> None:
    with pytest.raises(ConfigError) as err:
        tiny(position_embedding_type="yarn").finalize()
    assert problem_paths(err) == {"position_embedding_type"}


def test_default_recompute_num_layers_is_inert_and_recompute_is_built() -> None:
    provider = tiny()
    provider.finalize()
    assert provider.recompute_num_layers == 1
    assert provider.t5_spec().recompute_granularity is None
    # Any other value without full recompute is still the generic mistake.
    with pytest.raises(ConfigError) as err:
        tiny(recompute_num_layers=2).finalize()
    assert problem_paths(err) == {"recompute_num_layers"}
    # Selective recompute keeps the inert default, and takes GPT's modules.
    spec = tiny(recompute_granularity="selective", recompute_modules=["mlp"]).t5_spec()
    assert (spec.recompute_granularity, spec.recompute_modules, spec.recompute_num_layers) == (
        "selective",
        ("mlp",),
        None,
    )
    # Full recompute: the chunk may be as long as the deeper stack, and is capped per stack.
    model = tiny(
        encoder_num_layers=3, recompute_granularity="full", recompute_method="block", recompute_num_layers=3
    ).provide(init_seed=0)
    assert (model.encoder.recompute_method, model.encoder.recompute_num_layers) == ("block", 3)
    assert (model.decoder.recompute_method, model.decoder.recompute_num_layers) == ("block", 2)
    with pytest.raises(ConfigError) as err:
        tiny(
            encoder_num_layers=3,
            recompute_granularity="full",
            recompute_method="block",
            recompute_num_layers=4,
        ).finalize()
    assert problem_paths(err) == {"recompute_num_layers"}
    with pytest.raises(ConfigError) as err:
        tiny(recompute_granularity="full").finalize()
    assert problem_paths(err) == {"recompute_method"}


def test_tensor_and_sequence_parallel_sizes_are_checked_for_both_stacks() -> None:
    provider = tiny(tensor_model_parallel_size=2, sequence_parallel=True, vocab_size=95)
    provider.finalize()
    assert provider.padded_vocab_size() == 96  # a multiple of the tensor-parallel size
    with pytest.raises(ConfigError) as err:
        tiny(tensor_model_parallel_size=2, sequence_parallel=True, seq_length_dec=7).finalize()
    assert problem_paths(err) == {"sequence_parallel"}
    assert "seq_length_dec" in err.value.problems[0].message


def test_derived_sizes_follow_edits() -> None:
    provider = T5ModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4)
    provider.finalize()
    assert provider.ffn_hidden_size == 256 and provider.kv_channels == 16
    assert provider.effective_encoder_num_layers == 2
    provider.hidden_size = 128
    provider.encoder_num_layers = 3
    provider.finalize()
    assert provider.ffn_hidden_size == 512 and provider.kv_channels == 32
    assert provider.effective_encoder_num_layers == 3


def test_padded_vocab_size() -> None:
    assert tiny(vocab_size=100).padded_vocab_size() == 100
    assert tiny(vocab_size=100, should_pad_vocab=True).padded_vocab_size() == 128
    padded = tiny(vocab_size=50, should_pad_vocab=True, make_vocab_size_divisible_by=64)
    assert padded.padded_vocab_size() == 64
    with pytest.raises(ConfigError, match="vocab_size"):
        tiny(vocab_size=None).padded_vocab_size()


# ---------------------------------------------------------------------------------------------- provide


@pytest.mark.parametrize("position_embedding_type", POSITION_TYPES)
@pytest.mark.parametrize("tied", [True, False])
def test_provide_builds_the_model_of_the_fields(position_embedding_type: str, tied: bool) -> None:
    provider = tiny(
        encoder_num_layers=3,
        position_embedding_type=position_embedding_type,
        share_embeddings_and_output_weights=tied,
        vocab_size=90,
        should_pad_vocab=True,
        make_vocab_size_divisible_by=32,
        activation_func="relu",
        gated_linear_unit=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        softmax_scale=1.0,
        layernorm_epsilon=1e-6,
    )
    model = provider.provide(init_seed=0)
    assert isinstance(model, T5Model)
    spec = model.spec
    assert spec == provider.t5_spec()
    assert (spec.vocab_size, spec.encoder_num_layers, spec.decoder_num_layers) == (96, 3, 2)
    assert (spec.activation, spec.gated_linear_unit, spec.normalization) == ("relu", True, "RMSNorm")
    assert spec.position_embedding_type == position_embedding_type
    assert spec.share_embeddings_and_output_weights is tied and spec.softmax_scale == 1.0
    assert spec.layernorm_epsilon == 1e-6 and spec.head_dim == 8 and spec.ffn_hidden_size == 64
    assert len(model.encoder.layers) == 3 and len(model.decoder.layers) == 2
    count = sum(p.numel() for p in model.parameters())
    assert count == t5_num_parameters(spec) == t5_provider_num_parameters(provider)
    fc1 = dict(model.named_parameters())["encoder.layers.2.mlp.linear_fc1.weight"]
    assert fc1.shape == (2 * 64, 32)  # gated: gate and up rows
    logits = model(torch.zeros(2, 10, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    assert logits.shape == (2, 4, 96)


def test_activation_functions_map_to_their_short_names() -> None:
    for value, name in (
        ("gelu", "gelu"),
        ("swish", "silu"),
        (torch.nn.functional.silu, "silu"),
        ("torch.nn.functional.relu", "relu"),
        ("fast_gelu", "fast_gelu"),
        ("squared_relu", "squared_relu"),
    ):
        assert tiny(activation_func=value).t5_spec().activation == name, value


def test_dtype_and_no_encoder_depth() -> None:
    provider = tiny(params_dtype="bf16", bf16=True)
    model = provider.provide(init_seed=0)
    assert model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    assert model.spec.encoder_num_layers == model.spec.decoder_num_layers == 2


def test_meta_build_then_init_equals_a_direct_build() -> None:
    direct = tiny(position_embedding_type="rope").provide(init_seed=7)
    lazy = tiny(position_embedding_type="rope", init_model_with_meta_device=True).provide(init_seed=7)
    assert all(t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
    lazy.to_empty(device="cpu")
    lazy.init_weights(7)
    expected = direct.state_dict()
    got = lazy.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
    # The seed decides the weights.
    other = tiny(position_embedding_type="rope").provide(init_seed=8)
    assert not torch.equal(other.embedding.word_embeddings.weight, direct.embedding.word_embeddings.weight)
    torch.manual_seed(3)
    a = tiny().provide()
    torch.manual_seed(3)
    b = tiny().provide()
    assert torch.equal(a.embedding.word_embeddings.weight, b.embedding.word_embeddings.weight)


def test_uninitialized_build_still_has_its_rotary_tables() -> None:
    built = tiny(position_embedding_type="rope", perform_initialization=False).provide()
    reference = tiny(position_embedding_type="rope").provide(init_seed=0)
    assert built.rotary_pos_emb is not None and reference.rotary_pos_emb is not None
    for (name, got), (_, want) in zip(
        built.rotary_pos_emb.named_buffers(), reference.rotary_pos_emb.named_buffers(), strict=True
    ):
        assert torch.equal(got, want), name


def test_provide_refuses_stage_arguments_and_bad_fields() -> None:
    with pytest.raises(ConfigError) as err:
        tiny().provide(False, False, 1)
    assert problem_paths(err) == {"pre_process", "post_process", "vp_stage"}
    tiny().provide(True, True)
    with pytest.raises(ConfigError) as err:
        tiny(context_parallel_size=2).provide()
    assert "context_parallel_size" in problem_paths(err)


# ---------------------------------------------------------------------------------------------- YAML


def test_yaml_round_trip(tmp_path) -> None:
    provider = tiny(
        encoder_num_layers=3,
        position_embedding_type="relative",
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        seq_length_dec=32,
        activation_func="relu",
        normalization="RMSNorm",
    )
    path = tmp_path / "t5.yaml"
    provider.to_yaml(path)
    loaded = ModelProvider.from_yaml(path)
    assert type(loaded) is T5ModelProvider
    assert loaded == provider
    named = T5ModelProvider3B(vocab_size=32128)
    named.to_yaml(path)
    assert ModelProvider.from_yaml(path) == named


def test_megatron_bridge_yaml_loads(tmp_path) -> None:
    path = tmp_path / "bridge_t5.yaml"
    path.write_text(
        "_target_: megatron.bridge.models.t5_provider.T5ModelProvider\n"
        "num_layers: 2\n"
        "encoder_num_layers: 3\n"
        "hidden_size: 32\n"
        "num_attention_heads: 4\n"
        "vocab_size: 96\n"
        "max_position_embeddings: 64\n"
        "seq_length: 64\n"
        "seq_length_dec: 16\n"
        "position_embedding_type: rope\n"
        "apply_rope_fusion: false\n"
        "num_moe_experts: null\n"
        "tp_comm_overlap_cfg: null\n"
        "activation_func:\n"
        "  _target_: torch.nn.functional.gelu\n"
        "  _call_: false\n"
        "transformer_layer_spec:\n"
        "  _target_: megatron.bridge.models.t5_provider.transformer_engine_layer_spec\n"
        "  _call_: false\n"
    )
    with pytest.warns(UserWarning, match="transformer_layer_spec"):
        provider = ModelProvider.from_yaml(path)
    assert type(provider) is T5ModelProvider
    assert provider.encoder_num_layers == 3 and provider.position_embedding_type == "rope"
    assert not provider.apply_rope_fusion
    model = provider.provide(init_seed=0)
    assert len(model.encoder.layers) == 3 and model.rotary_pos_emb is not None


def test_training_refuses_t5_models_without_span_corruption_data() -> None:
    cfg = tiny_gpt_pretrain_config()
    apply_overrides(
        cfg, ["model=t5", "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4"]
    )
    assert type(cfg.model) is T5ModelProvider
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    messages = {p.path: p.message for p in err.value.problems}
    assert messages["dataset"].startswith("a T5 model trains on span-corruption data")


# ---------------------------------------------------------------------------------------------- sizes

T5_VOCAB = 32128  # T5's SentencePiece vocabulary, as Hugging Face pads it


# NeMo 2's classes (nemo.collections.llm.t5.model.t5.T5Config220M / 3B / 11B) set only the shape, so
# their MLP is Megatron's default GELU. The NeMo Framework Launcher configurations the sizes are named
# after (conf/training/t5/220m.yaml, 3b.yaml, 11b.yaml) use GeGLU: for 220M with a 2048 MLP (the
# weights of a 3072 GELU MLP), for 3B and 11B with the same 5120 / 10240 MLP, which is what their size
# labels count.
@pytest.mark.parametrize(
    ("cls", "shape", "count", "launcher", "launcher_count", "label"),
    [
        (
            T5ModelProvider220M,
            (12, 12, 768, 3072, 12),
            223_578_496,
            {"ffn_hidden_size": 2048, "gated_linear_unit": True},
            223_603_072,  # 1024 more fc1 bias values per layer
            220e6,
        ),
        (
            T5ModelProvider3B,
            (24, 24, 2048, 5120, 32),
            2_282_904_960,
            {"gated_linear_unit": True},
            2_786_467_200,
            3e9,
        ),
        (
            T5ModelProvider11B,
            (24, 24, 4096, 10240, 64),
            8_994_962_816,
            {"gated_linear_unit": True},
            11_008_720_256,
            11e9,
        ),
    ],
    ids=["220M", "3B", "11B"],
)
def test_named_sizes(
    cls: type[T5ModelProvider],
    shape: tuple[int, ...],
    count: int,
    launcher: dict[str, object],
    launcher_count: int,
    label: float,
) -> None:
    provider = cls(vocab_size=T5_VOCAB)
    provider.finalize()
    got = (
        provider.effective_encoder_num_layers,
        provider.num_layers,
        provider.hidden_size,
        provider.ffn_hidden_size,
        provider.num_attention_heads,
    )
    assert got == shape and provider.kv_channels == 64
    assert t5_provider_num_parameters(provider) == count
    # The model really holds that many (built on meta: no memory).
    model = dataclasses.replace(provider, init_model_with_meta_device=True).provide()
    assert sum(p.numel() for p in model.parameters()) == count
    assert t5_provider_num_parameters(cls(vocab_size=T5_VOCAB, **launcher)) == launcher_count  # type: ignore[arg-type]
    # The label rounds the launcher's count (3B: T5's own "3B" label rounds 2.85B the same way).
    assert abs(launcher_count - label) / label < 0.08


def test_t5_base_layout_matches_hugging_face_count() -> None:
    # google-t5/t5-base (T5 v1.0) on Hugging Face: 222,903,552 parameters. Its layout: relative
    # positions, RMSNorm, no biases, ReLU MLP, tied embeddings. viaduct's tied output layer adds
    # Megatron's LM-head bias, one value per vocabulary row.
    provider = T5ModelProvider220M(
        vocab_size=T5_VOCAB,
        position_embedding_type="relative",
        normalization="RMSNorm",
        add_bias_linear=False,
        activation_func="relu",
        softmax_scale=1.0,
    )
    assert t5_provider_num_parameters(provider) == 222_903_552 + T5_VOCAB


# ---------------------------------------------------------------------------------------------- training


def test_provided_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = tiny(position_embedding_type="relative").provide(init_seed=0).train()
    gen = torch.Generator().manual_seed(1)
    enc = torch.randint(0, 96, (4, 12), generator=gen)
    dec = torch.randint(0, 96, (4, 8), generator=gen)
    labels = torch.roll(dec, -1, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        loss = model(enc, dec, labels=labels).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first is not None and loss.item() < 0.1 * first


def test_spec_type_is_the_model_one() -> None:
    assert isinstance(tiny().t5_spec(), T5Spec)
