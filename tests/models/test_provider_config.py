"""TransformerConfig / GPTModelProvider: defaults, finalize() rules, derived values, YAML round trip."""

import subprocess
import sys

import pytest

from viaduct.config import ConfigError, DType, FunctionRef
from viaduct.config.provenance import is_derived, is_user_set
from viaduct.models import AttnBackend, GPTModelProvider, ModelProvider, TransformerConfig


def small(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128)
    base.update(kw)
    return GPTModelProvider(**base)


def problems(cfg) -> dict[str, str]:
    """path -> message of every problem finalize() reports ({} when it passes)."""
    try:
        cfg.finalize()
    except ConfigError as exc:
        out: dict[str, str] = {}
        for p in exc.problems:
            out.setdefault(p.path, p.message)
        return out
    return {}


def test_documented_standalone_usage_works():
    cfg = GPTModelProvider(
        num_layers=24, hidden_size=2048, num_attention_heads=16, vocab_size=50000, seq_length=2048
    )
    cfg.finalize()
    assert (cfg.ffn_hidden_size, cfg.kv_channels, cfg.num_query_groups) == (8192, 128, 16)
    assert cfg.seq_length == 2048


def test_the_bridge_doc_example_without_heads_gets_a_clear_error():
    # Bridge's doc example leaves num_attention_heads at 0 (Megatron then divides by zero).
    cfg = GPTModelProvider(num_layers=24, hidden_size=2048, vocab_size=50000, seq_length=2048)
    with pytest.raises(ConfigError) as exc:
        cfg.finalize()
    (p,) = exc.value.problems
    assert (
        p.path == "num_attention_heads"
        and "must be set" in p.message
        and "model.num_attention_heads" in p.fix
    )


def test_effective_gpt_defaults():
    cfg = GPTModelProvider()
    assert cfg.seq_length == 1024
    assert cfg.activation_func == FunctionRef("gelu")
    assert cfg.params_dtype == DType("float32") and cfg.pipeline_dtype is None
    assert cfg.attention_backend is AttnBackend.auto
    assert cfg.window_size is None
    assert cfg.share_embeddings_and_output_weights is True
    assert cfg.attention_softmax_in_fp32 is False
    assert cfg.masked_softmax_fusion is True and cfg.cross_entropy_loss_fusion is True
    assert cfg.deallocate_pipeline_outputs is True
    assert cfg.make_vocab_size_divisible_by == 128 and cfg.should_pad_vocab is False
    assert (cfg.hidden_dropout, cfg.attention_dropout, cfg.init_method_std) == (0.1, 0.1, 0.02)
    assert cfg.tensor_model_parallel_size == 1 and cfg.sequence_parallel is False


def test_attn_backend_values_match_megatron():
    assert {m.name: m.value for m in AttnBackend} == {
        "flash": 1,
        "fused": 2,
        "unfused": 3,
        "local": 4,
        "auto": 5,
    }


def test_yaml_lists_the_fields_that_shape_the_model_before_the_megatron_compatibility_fields():
    from viaduct.models.megatron_compat import MegatronCompatFields

    compat = MegatronCompatFields.spec().public_names()
    keys = [key for key in small().to_dict() if key != "_target_"]
    assert keys[: len(keys) - len(compat)][:3] == ["num_layers", "hidden_size", "num_attention_heads"]
    assert keys[len(keys) - len(compat) :] == compat  # after GPTModelProvider's own fields too
    assert keys.index("hf_model_id") < keys.index("num_moe_experts")
    # Only the listing moves: every field is still a TransformerConfig field.
    assert issubclass(TransformerConfig, MegatronCompatFields) and MegatronCompatFields._abstract_config_
    assert set(compat) < set(TransformerConfig.spec().public_names())


def test_abstract_bases_and_alias():
    assert TransformerConfig._abstract_config_ and ModelProvider._abstract_config_
    assert not GPTModelProvider._abstract_config_
    assert ModelProvider.variant("gpt") is GPTModelProvider
    assert isinstance(ModelProvider.from_string("gpt"), GPTModelProvider)


def test_typo_in_python_raises_with_suggestion():
    cfg = small()
    with pytest.raises(AttributeError, match="hidden_size"):
        cfg.hiden_size = 3


# ------------------------------------------------------------------ derived values


def test_derived_values_and_provenance():
    cfg = small(init_method_std=0.01)
    cfg.finalize()
    assert cfg.ffn_hidden_size == 256 and cfg.kv_channels == 16 and cfg.num_query_groups == 4
    assert cfg.autocast_dtype == DType("float32")
    assert cfg.embedding_init_method_std == 0.01
    assert cfg.recompute_modules == ["core_attn"]
    assert cfg.expert_tensor_parallel_size == 1 and cfg.microbatch_group_size_per_vp_stage == 1
    assert cfg.pipeline_dtype is None  # only derived with pipeline parallelism
    assert is_derived(cfg.source_of("ffn_hidden_size"))
    assert cfg.effective_attention_softmax_in_fp32 is False


def test_finalize_is_idempotent_and_derived_values_follow_edits():
    cfg = small()
    cfg.finalize()
    cfg.finalize()
    assert cfg.ffn_hidden_size == 256
    cfg.hidden_size = 128
    cfg.num_attention_heads = 8
    cfg.params_dtype = "bf16"
    cfg.finalize()
    assert cfg.ffn_hidden_size == 512 and cfg.kv_channels == 16 and cfg.num_query_groups == 8
    assert cfg.autocast_dtype == DType("bfloat16")


def test_user_set_values_are_never_overwritten():
    cfg = small(ffn_hidden_size=100, kv_channels=32, num_query_groups=2, autocast_dtype="fp16")
    cfg.finalize()
    cfg.hidden_size = 128
    cfg.finalize()
    assert (cfg.ffn_hidden_size, cfg.kv_channels, cfg.num_query_groups) == (100, 32, 2)
    assert cfg.autocast_dtype == DType("float16")
    assert is_user_set(cfg.source_of("ffn_hidden_size"))


def test_value_set_after_finalize_replaces_a_derived_one():
    cfg = small()
    cfg.finalize()
    cfg.ffn_hidden_size = 300
    cfg.hidden_size = 128
    cfg.finalize()
    assert cfg.ffn_hidden_size == 300


def test_derived_values_set_elsewhere_are_kept():
    # e.g. the mixed-precision recipe sets pipeline_dtype: finalize() must not undo it.
    cfg = small()
    cfg.derive("pipeline_dtype", DType("bf16"), "mixed_precision bf16_mixed")
    cfg.finalize()
    cfg.finalize()
    assert cfg.pipeline_dtype == DType("bfloat16")


def test_query_key_layer_scaling_forces_fp32_softmax_without_touching_the_user_field():
    cfg = small(apply_query_key_layer_scaling=True)
    cfg.finalize()
    assert cfg.attention_softmax_in_fp32 is False
    assert cfg.effective_attention_softmax_in_fp32 is True
    cfg.apply_query_key_layer_scaling = False
    cfg.finalize()
    assert cfg.effective_attention_softmax_in_fp32 is False


def test_derived_field_cannot_be_assigned():
    cfg = small()
    with pytest.raises(AttributeError, match="derived"):
        cfg.effective_attention_softmax_in_fp32 = True


def test_apply_overrides_and_finalize():
    cfg = small()
    out = cfg.apply_overrides_and_finalize(
        dtype="bf16", overrides={"num_layers": 4, "normalization": "RMSNorm"}
    )
    assert out is cfg
    assert cfg.params_dtype == DType("bfloat16") and cfg.bf16 is True and cfg.fp16 is False
    assert cfg.num_layers == 4 and cfg.normalization == "RMSNorm" and cfg.ffn_hidden_size == 256
    cfg.apply_overrides_and_finalize(dtype="fp16")
    assert cfg.fp16 is True and cfg.bf16 is False
    with pytest.raises(AttributeError, match="num_layers"):
        cfg.apply_overrides_and_finalize(overrides={"num_layer": 3})


# ------------------------------------------------------------------ finalize rules

RULES = [
    # (field overrides, path, words in the message)
    ({"num_layers": 0}, "num_layers", "must be set"),
    ({"hidden_size": 0}, "hidden_size", "must be set"),
    ({"num_attention_heads": 0}, "num_attention_heads", "must be set"),
    ({"hidden_size": 66}, "num_attention_heads", "must divide hidden_size (66) when kv_channels is unset"),
    ({"num_query_groups": 3}, "num_query_groups", "must divide num_attention_heads"),
    ({"num_query_groups": 0}, "num_query_groups", "must be > 0"),
    ({"kv_channels": 0}, "kv_channels", "must be > 0"),
    ({"ffn_hidden_size": -1}, "ffn_hidden_size", "must be > 0"),
    ({"vocab_size": 0}, "vocab_size", "must be > 0"),
    ({"seq_length": 0}, "seq_length", "must be > 0"),
    ({"make_vocab_size_divisible_by": 0}, "make_vocab_size_divisible_by", "must be > 0"),
    ({"layernorm_epsilon": 0.0}, "layernorm_epsilon", "must be > 0"),
    ({"init_method_std": 0.0}, "init_method_std", "must be > 0"),
    ({"embedding_init_method_std": -0.1}, "embedding_init_method_std", "must be > 0"),
    ({"hidden_dropout": 1.0}, "hidden_dropout", "[0, 1)"),
    ({"attention_dropout": -0.1}, "attention_dropout", "[0, 1)"),
    ({"fp16": True, "bf16": True}, "bf16", "cannot both be true"),
    ({"bf16": True, "params_dtype": "fp16"}, "params_dtype", "contradicts"),
    ({"params_dtype": "int8"}, "params_dtype", "float32, bfloat16 or float16"),
    ({"normalization": "rmsnorm"}, "normalization", "must be one of 'LayerNorm', 'RMSNorm'"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type", "must be one of"),
    (
        {"position_embedding_type": "yarn"},
        "position_embedding_type",
        "YaRN rotary scaling is not supported yet",
    ),
    ({"rotary_percent": 0.0}, "rotary_percent", "(0, 1]"),
    ({"rotary_percent": 1.5}, "rotary_percent", "(0, 1]"),
    ({"rope_scaling": True}, "rope_scaling", "needs position_embedding_type 'rope'"),
    ({"window_size": (-2, 0)}, "window_size", ">= 0"),
    ({"recompute_granularity": "partial"}, "recompute_granularity", "must be one of"),
    ({"recompute_granularity": "full", "recompute_num_layers": 1}, "recompute_method", "must be set"),
    ({"recompute_granularity": "full", "recompute_method": "uniform"}, "recompute_num_layers", "must be set"),
    (
        {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 3},
        "recompute_num_layers",
        "[1, num_layers (2)]",
    ),
    ({"recompute_method": "uniform"}, "recompute_method", "only applies to recompute_granularity 'full'"),
    (
        {"recompute_granularity": "selective", "recompute_num_layers": 1},
        "recompute_num_layers",
        "only applies",
    ),
    ({"recompute_modules": ["core_attn", "attn"]}, "recompute_modules", "unknown module(s): 'attn'"),
    (
        {"tensor_model_parallel_size": 3},
        "tensor_model_parallel_size",
        "cannot be split evenly over 3 tensor-parallel ranks",
    ),
    (
        {"pipeline_model_parallel_size": 3},
        "pipeline_model_parallel_size",
        "num_layers 2 cannot be split evenly over 3 pipeline ranks",
    ),
    ({"context_parallel_size": 3}, "context_parallel_size", "is not divisible by 6"),
    (
        {"expert_model_parallel_size": 2},
        "expert_model_parallel_size",
        "expert parallelism is not supported yet",
    ),
    ({"tensor_model_parallel_size": 0}, "tensor_model_parallel_size", "must be >= 1"),
    ({"expert_tensor_parallel_size": 2}, "expert_tensor_parallel_size", "expert tensor parallelism is not"),
    (
        {"virtual_pipeline_model_parallel_size": 2},
        "virtual_pipeline_model_parallel_size",
        "needs pipeline_model",
    ),
    ({"sequence_parallel": True}, "sequence_parallel", "needs tensor_model_parallel_size > 1"),
    (
        {"num_layers_in_first_pipeline_stage": 1},
        "num_layers_in_first_pipeline_stage",
        "only applies with pipe",
    ),
    ({"account_for_loss_in_pipeline_split": True}, "account_for_loss_in_pipeline_split", "only applies"),
    ({"overlap_p2p_comm": True}, "overlap_p2p_comm", "cannot be combined with batch_p2p_comm"),
    (
        {"distribute_saved_activations": True, "sequence_parallel": True},
        "distribute_saved_activations",
        "cannot",
    ),
    ({"num_moe_experts": 8}, "num_moe_experts", "mixture-of-experts layers is not supported yet"),
    ({"fp8": "hybrid"}, "fp8", "FP8 training is not supported yet"),
    ({"fp8_param": True}, "fp8_param", "FP8 training is not supported yet"),
    ({"fp4": "e2m1"}, "fp4", "FP4 training is not supported yet"),
    ({"cpu_offloading": True}, "cpu_offloading", "not supported yet"),
    ({"fine_grained_activation_offloading": True}, "fine_grained_activation_offloading", "not supported yet"),
    ({"cuda_graph_impl": "transformer_engine"}, "cuda_graph_impl", "CUDA graphs are not supported yet"),
    ({"tp_comm_overlap": True}, "tp_comm_overlap", "but tensor_model_parallel_size is 1"),
    (
        {"tp_comm_overlap": True, "tensor_model_parallel_size": 2},
        "tp_comm_overlap",
        "needs model.sequence_parallel",
    ),
    ({"cross_entropy_fusion_impl": "te"}, "cross_entropy_fusion_impl", "not supported yet"),
    ({"mtp_num_layers": 1}, "mtp_num_layers", "multi-token prediction is not supported yet"),
    ({"hidden_size": "wide"}, "hidden_size", "expected int"),
    ({"distribute_saved_activations": True}, "distribute_saved_activations", "is not supported yet"),
    ({"window_size": (4, 2)}, "window_size", "right side must be 0 or -1"),
    (
        {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "moe_act"]},
        "recompute_modules",
        "'moe_act' recompute mixture-of-experts",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "path", "words"), RULES, ids=[r[1] + "-" + str(i) for i, r in enumerate(RULES)]
)
def test_rule(overrides, path, words):
    found = problems(small(**overrides))
    assert path in found, found
    assert words in found[path]


def test_rule_problems_carry_value_and_a_model_dotted_fix():
    with pytest.raises(ConfigError) as exc:
        small(num_query_groups=3).finalize()
    (p,) = exc.value.problems
    assert p.value == 3
    assert "model.num_query_groups" in p.fix
    assert "num_query_groups" in str(exc.value)


def test_all_problems_are_reported_at_once():
    cfg = small(
        num_layers=0,
        hidden_dropout=2.0,
        fp16=True,
        bf16=True,
        tensor_model_parallel_size=3,
        normalization="rmsnorm",
        num_moe_experts=4,
    )
    found = problems(cfg)
    assert {
        "num_layers",
        "hidden_dropout",
        "bf16",
        "tensor_model_parallel_size",
        "normalization",
        "num_moe_experts",
    } <= set(found)


def test_a_badly_typed_field_does_not_crash_the_rules_that_use_it():
    found = problems(small(num_attention_heads="four", kv_channels=None))
    assert set(found) == {"num_attention_heads"}


def test_valid_variants_pass():
    assert problems(small(normalization="RMSNorm", gated_linear_unit=True, activation_func="silu")) == {}
    assert problems(small(position_embedding_type="rope", rope_scaling=True, rope_scaling_factor=8.0)) == {}
    assert problems(small(position_embedding_type="none", window_size=(128, 0))) == {}
    assert problems(small(window_size=(-1, -1), qk_layernorm=True)) == {}
    assert (
        problems(small(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
        == {}
    )
    assert problems(small(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])) == {}
    assert problems(small(num_query_groups=1, hidden_size=60, kv_channels=16)) == {}
    assert problems(small(bf16=True, params_dtype="bf16", attention_backend=AttnBackend.flash)) == {}
    assert problems(small(overlap_p2p_comm=True, batch_p2p_comm=False)) == {}


# ------------------------------------------------------------------ serialization


def test_yaml_round_trip():
    cfg = small(
        activation_func="silu",
        params_dtype="bf16",
        bf16=True,
        window_size=(256, 0),
        attention_backend=AttnBackend.flash,
        recompute_modules=["core_attn"],
        moe_layer_freq=[1, 0],
        logit_dtype="fp32",
        hf_model_id="org/model",
    )
    assert GPTModelProvider.from_dict(cfg.to_dict()) == cfg
    back = GPTModelProvider.from_dict(cfg.to_dict())
    assert back.window_size == (256, 0) and back.attention_backend is AttnBackend.flash
    cfg.finalize()
    assert GPTModelProvider.from_dict(cfg.to_dict()) == cfg
    assert ModelProvider.from_dict(cfg.to_dict()) == cfg


def test_yaml_file_round_trip(tmp_path):
    cfg = small(params_dtype="bf16")
    cfg.finalize()
    path = tmp_path / "model.yaml"
    cfg.to_yaml(path)
    assert GPTModelProvider.from_yaml(path) == cfg


def test_megatron_yaml_with_legacy_fields_loads():
    data = {
        "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "attention_backend": {
            "_target_": "megatron.core.transformer.enums.AttnBackend",
            "_call_": True,
            "_args_": [1],
            "_name_": "flash",
        },
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "params_dtype": {"_target_": "torch.bfloat16", "_call_": False},
        "transformer_layer_spec": {
            "_target_": "megatron.bridge.models.gpt_provider.default_layer_spec",
            "_call_": False,
        },
        "init_method": {"_target_": "torch.nn.init.normal_", "_partial_": True, "mean": 0.0, "std": 0.02},
        "timers": None,
        "transformer_impl": "transformer_engine",
    }
    with pytest.warns(UserWarning, match="dropped"):
        cfg = ModelProvider.from_dict(data)
    assert isinstance(cfg, GPTModelProvider)
    assert cfg.attention_backend is AttnBackend.flash and cfg.activation_func == FunctionRef("silu")
    assert cfg.params_dtype == DType("bf16")
    cfg.finalize()


def test_unknown_key_in_a_mapping_is_an_error():
    with pytest.raises(ConfigError, match="num_layer"):
        GPTModelProvider.from_dict({"num_layer": 2})


def test_model_config_imports_without_torch():
    code = (
        "import sys, viaduct.models, viaduct.peft, viaduct.training.mixed_precision, "
        "viaduct.training.comm_overlap; viaduct.models.GPTModelProvider(num_layers=1, hidden_size=8, "
        "num_attention_heads=2).finalize(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deterministic_mode_is_refused_until_it_is_built():
    provider = GPTModelProvider(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=128,
        seq_length=32,
        deterministic_mode=True,
    )
    with pytest.raises(
        ConfigError, match="deterministic_mode: deterministic-only kernels is not supported yet"
    ):
        provider.finalize()
