"""Named model providers (Llama, Qwen, Mistral, GPT-2): published shapes, names, YAML, overrides."""

import dataclasses
import inspect

import pytest

from viaduct.config import FunctionRef, apply_overrides
from viaduct.config.docstrings import field_docstrings
from viaduct.models import (
    GPT2ModelProvider,
    GPT2ModelProvider1P5B,
    GPT2ModelProvider124M,
    GPT2ModelProvider355M,
    GPT2ModelProvider774M,
    GPTModelProvider,
    Llama2ModelProvider7B,
    Llama2ModelProvider13B,
    Llama2ModelProvider70B,
    Llama3ModelProvider,
    Llama3ModelProvider8B,
    Llama3ModelProvider70B,
    Llama31ModelProvider,
    Llama31ModelProvider8B,
    Llama31ModelProvider70B,
    Llama31ModelProvider405B,
    Llama32ModelProvider1B,
    Llama32ModelProvider3B,
    LlamaModelProvider,
    MistralModelProvider,
    MistralModelProvider7B,
    ModelProvider,
    Qwen3ModelProvider,
    Qwen3ModelProvider1P7B,
    Qwen3ModelProvider4B,
    Qwen3ModelProvider8B,
    Qwen3ModelProvider600M,
    Qwen25ModelProvider,
    Qwen25ModelProvider1P5B,
    Qwen25ModelProvider3B,
    Qwen25ModelProvider7B,
    Qwen25ModelProvider14B,
    Qwen25ModelProvider500M,
)
from viaduct.models.accounting import num_parameters
from viaduct.recipes import get_recipe, tiny_gpt_pretrain_config

# class, short name, Hugging Face id, published parameter count (model cards / HF safetensors
# metadata; each shared tensor counted once, unpadded vocabulary).
SIZES = [
    (GPT2ModelProvider124M, "gpt2_124m", "openai-community/gpt2", 124_439_808),
    (GPT2ModelProvider355M, "gpt2_355m", "openai-community/gpt2-medium", 354_823_168),
    (GPT2ModelProvider774M, "gpt2_774m", "openai-community/gpt2-large", 774_030_080),
    (GPT2ModelProvider1P5B, "gpt2_1p5b", "openai-community/gpt2-xl", 1_557_611_200),
    (Llama2ModelProvider7B, "llama2_7b", "meta-llama/Llama-2-7b-hf", 6_738_415_616),
    (Llama2ModelProvider13B, "llama2_13b", "meta-llama/Llama-2-13b-hf", 13_015_864_320),
    (Llama2ModelProvider70B, "llama2_70b", "meta-llama/Llama-2-70b-hf", 68_976_648_192),
    (Llama3ModelProvider8B, "llama3_8b", "meta-llama/Meta-Llama-3-8B", 8_030_261_248),
    (Llama3ModelProvider70B, "llama3_70b", "meta-llama/Meta-Llama-3-70B", 70_553_706_496),
    (Llama31ModelProvider8B, "llama31_8b", "meta-llama/Llama-3.1-8B", 8_030_261_248),
    (Llama31ModelProvider70B, "llama31_70b", "meta-llama/Llama-3.1-70B", 70_553_706_496),
    (Llama31ModelProvider405B, "llama31_405b", "meta-llama/Llama-3.1-405B", 405_853_388_800),
    (Llama32ModelProvider1B, "llama32_1b", "meta-llama/Llama-3.2-1B", 1_235_814_400),
    (Llama32ModelProvider3B, "llama32_3b", "meta-llama/Llama-3.2-3B", 3_212_749_824),
    (Qwen25ModelProvider500M, "qwen25_500m", "Qwen/Qwen2.5-0.5B", 494_032_768),
    (Qwen25ModelProvider1P5B, "qwen25_1p5b", "Qwen/Qwen2.5-1.5B", 1_543_714_304),
    (Qwen25ModelProvider3B, "qwen25_3b", "Qwen/Qwen2.5-3B", 3_085_938_688),
    (Qwen25ModelProvider7B, "qwen25_7b", "Qwen/Qwen2.5-7B", 7_615_616_512),
    (Qwen25ModelProvider14B, "qwen25_14b", "Qwen/Qwen2.5-14B", 14_770_033_664),
    (Qwen3ModelProvider600M, "qwen3_600m", "Qwen/Qwen3-0.6B", 596_049_920),
    # HF's safetensors total for Qwen3-1.7B is 2_031_739_904 because the checkpoint stores lm_head
    # separately although config.json ties it (tie_word_embeddings: true); the model itself has the
    # tied count below (its card: 1.7B total, 1.4B non-embedding). See the untied check further down.
    (Qwen3ModelProvider1P7B, "qwen3_1p7b", "Qwen/Qwen3-1.7B", 1_720_574_976),
    (Qwen3ModelProvider4B, "qwen3_4b", "Qwen/Qwen3-4B", 4_022_468_096),
    (Qwen3ModelProvider8B, "qwen3_8b", "Qwen/Qwen3-8B", 8_190_735_360),
    (MistralModelProvider7B, "mistral_7b", "mistralai/Mistral-7B-v0.1", 7_241_732_096),
]
FAMILIES = [
    (LlamaModelProvider, "llama"),
    (Llama3ModelProvider, "llama3"),
    (Llama31ModelProvider, "llama31"),
    (Qwen25ModelProvider, "qwen25"),
    (Qwen3ModelProvider, "qwen3"),
    (MistralModelProvider, "mistral"),
    (GPT2ModelProvider, "gpt2"),
]
ALL = [c for c, *_ in SIZES] + [c for c, _ in FAMILIES]
ids = [c.__name__ for c, *_ in SIZES]


@pytest.mark.parametrize(("cls", "alias", "hf_id", "count"), SIZES, ids=ids)
def test_published_parameter_count(cls, alias, hf_id, count):
    p = cls()
    assert not p.should_pad_vocab
    assert num_parameters(p) == count


def test_qwen3_1p7b_safetensors_total_counts_the_stored_lm_head():
    untied = Qwen3ModelProvider1P7B(share_embeddings_and_output_weights=False)
    assert num_parameters(untied) == 2_031_739_904


@pytest.mark.parametrize(("cls", "alias", "hf_id", "count"), SIZES, ids=ids)
def test_size_finalizes_and_round_trips(cls, alias, hf_id, count, tmp_path):
    p = cls()
    assert p.hf_model_id == hf_id
    assert p.provenance() == {k: "default" for k in p.provenance()}  # defaults, not constructor args
    p.finalize()
    assert p.kv_channels * p.num_attention_heads >= p.hidden_size // 2
    path = tmp_path / "model.yaml"
    p.to_yaml(path)
    back = type(p).from_yaml(path)
    assert type(back) is cls and back == p
    assert GPTModelProvider.from_yaml(path) == p  # the `_target_` picks the class
    assert GPTModelProvider.from_dict(cls().to_dict()) == cls()


@pytest.mark.parametrize(("cls", "alias", "hf_id", "count"), SIZES, ids=ids)
def test_short_name_and_class_name_select_the_size(cls, alias, hf_id, count):
    assert GPTModelProvider.variant(alias) is cls
    assert ModelProvider.variant(alias) is cls
    assert ModelProvider.variant(cls.__name__) is cls
    assert ModelProvider.variant(alias.upper().replace("_", "-")) is cls
    assert type(ModelProvider.from_string(alias)) is cls


@pytest.mark.parametrize(("cls", "alias"), FAMILIES, ids=[c.__name__ for c, _ in FAMILIES])
def test_family_short_names(cls, alias):
    assert GPTModelProvider.variant(alias) is cls


def test_short_names_are_unique():
    names = [a for c in ModelProvider.variants() for a in c._aliases_]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("cls", "alias", "hf_id", "count"), SIZES, ids=ids)
def test_override_switches_the_model_by_name(cls, alias, hf_id, count):
    cfg = tiny_gpt_pretrain_config()
    apply_overrides(cfg, [f"model={alias}", "model.num_layers=2"])
    assert type(cfg.model) is cls
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == cls().hidden_size


def test_yaml_mapping_switches_the_model_by_name():
    cfg = tiny_gpt_pretrain_config()
    apply_overrides(cfg, {"model": "qwen3_600m"})
    assert type(cfg.model) is Qwen3ModelProvider600M


@pytest.mark.parametrize(
    "target",
    [
        "megatron.bridge.models.llama.llama_provider.Llama32ModelProvider1B",
        "megatron.bridge.models.Llama32ModelProvider1B",
    ],
)
def test_megatron_bridge_targets_map_by_class_name(target):
    data = Llama32ModelProvider1B().to_dict()
    data["_target_"] = target
    assert type(ModelProvider.from_dict(data)) is Llama32ModelProvider1B


@pytest.mark.parametrize("cls", ALL, ids=[c.__name__ for c in ALL])
def test_every_field_has_help_text_inherited_or_own(cls):
    assert set(inspect.get_annotations(cls))  # the class redeclares some defaults
    docs = field_docstrings(cls)
    assert all(docs.get(name) for name in cls.spec().public_names())
    assert docs["num_layers"] == field_docstrings(GPTModelProvider)["num_layers"]
    assert cls.__doc__ and "\n" not in cls.__doc__.strip()


@pytest.mark.parametrize("cls", ALL, ids=[c.__name__ for c in ALL])
def test_only_defaults_change(cls):
    """A named provider adds no fields: it is GPTModelProvider with other defaults."""
    assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in dataclasses.fields(GPTModelProvider)]


def test_family_defaults():
    llama = LlamaModelProvider()
    assert (llama.normalization, llama.layernorm_epsilon, llama.position_embedding_type) == (
        "RMSNorm",
        1e-5,
        "rope",
    )
    assert llama.activation_func == FunctionRef("silu") and llama.gated_linear_unit
    assert not llama.add_bias_linear and not llama.share_embeddings_and_output_weights
    assert (llama.hidden_dropout, llama.attention_dropout, llama.rotary_base, llama.seq_length) == (
        0.0,
        0.0,
        10000,
        4096,
    )
    l3 = Llama3ModelProvider()
    assert (l3.num_query_groups, l3.rotary_base, l3.vocab_size, l3.seq_length, l3.init_method_std) == (
        8,
        500_000,
        128_256,
        8192,
        0.01,
    )
    l31 = Llama31ModelProvider()
    assert (l31.rope_scaling, l31.rope_scaling_factor, l31.seq_length) == (True, 8.0, 131_072)
    l32 = Llama32ModelProvider1B()
    assert (l32.rope_scaling, l32.rope_scaling_factor, l32.kv_channels) == (True, 32.0, 64)
    assert l32.share_embeddings_and_output_weights

    q25 = Qwen25ModelProvider()
    assert (q25.layernorm_epsilon, q25.rotary_base, q25.add_bias_linear, q25.add_qkv_bias) == (
        1e-6,
        1_000_000,
        False,
        True,
    )
    assert (q25.vocab_size, q25.seq_length) == (151_936, 32_768)
    assert Qwen25ModelProvider7B().vocab_size == Qwen25ModelProvider14B().vocab_size == 152_064
    q3 = Qwen3ModelProvider()
    assert q3.qk_layernorm and not q3.add_qkv_bias and not q3.add_bias_linear
    assert (q3.kv_channels, q3.num_query_groups, q3.seq_length) == (128, 8, 40_960)
    assert q3.layernorm_epsilon == 1e-6

    m = MistralModelProvider7B()
    assert m.window_size == (4096, 0) and m.num_query_groups == 8 and m.vocab_size == 32000
    assert (m.rotary_base, m.seq_length, m.layernorm_epsilon) == (10000, 32_768, 1e-5)

    g = GPT2ModelProvider124M()
    assert g.activation_func == FunctionRef("fast_gelu") and not g.gated_linear_unit
    assert g.normalization == "LayerNorm" and g.add_bias_linear
    assert g.position_embedding_type == "learned_absolute" and g.share_embeddings_and_output_weights
    assert (g.vocab_size, g.seq_length, g.hidden_dropout, g.attention_dropout) == (50257, 1024, 0.1, 0.1)
    assert g.ffn_hidden_size is None
    g.finalize()
    assert g.ffn_hidden_size == 4 * 768


def test_llama_like_families_and_the_llama_recipe_share_one_architecture():
    from viaduct.models.gpt.provider import LlamaStyleProvider
    from viaduct.recipes.llama import llama_model

    arch = LlamaStyleProvider.architecture()
    assert arch == {
        "normalization": "RMSNorm",
        "layernorm_epsilon": 1e-5,
        "activation_func": FunctionRef("silu"),
        "gated_linear_unit": True,
        "position_embedding_type": "rope",
        "rotary_base": 10000,
        "add_bias_linear": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "share_embeddings_and_output_weights": False,
        "init_method_std": 0.02,
    }
    for cls in (LlamaModelProvider, MistralModelProvider, Qwen25ModelProvider, Qwen3ModelProvider):
        assert issubclass(cls, LlamaStyleProvider)
    assert not issubclass(GPT2ModelProvider, LlamaStyleProvider)
    assert LlamaStyleProvider._abstract_config_
    # The recipe's custom sizes keep the generic `_target_` with the same architecture.
    custom = llama_model(num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.1)
    assert type(custom) is GPTModelProvider
    llama = LlamaModelProvider()
    assert {k: getattr(custom, k) for k in arch if k != "hidden_dropout"} == {
        k: getattr(llama, k) for k in arch if k != "hidden_dropout"
    }
    assert (custom.hidden_dropout, custom.num_layers) == (0.1, 2)  # the shape wins


def test_user_values_win_over_the_named_defaults():
    p = Llama32ModelProvider1B(num_layers=2, seq_length=2048)
    p.finalize()
    assert (p.num_layers, p.seq_length, p.hidden_size) == (2, 2048, 2048)
    assert p.source_of("num_layers").startswith("python") and p.source_of("hidden_size") == "default"


def _refinalize_case():
    """The llama32_1b recipe with the user's explicit null for a field its class defaults to 8."""
    cfg = get_recipe("llama32_1b")()
    return apply_overrides(cfg, ["model.num_query_groups=null", "model.num_attention_heads=4"])


def test_refinalizing_keeps_the_users_null_over_the_class_default():
    cfg = _refinalize_case().validate()
    assert cfg.model.num_query_groups == 4  # follows the heads, as null asks
    before = cfg.model.to_dict()
    cfg.model.provide(device="meta")  # finalizes again
    cfg.model.provide(device="meta")
    assert cfg.model.to_dict() == before
    assert cfg.model.num_query_groups == 4 and cfg.model.source_of("num_query_groups").startswith("derived")
    # Undoing the derivation gives back what the user set, not Llama32ModelProvider1B's 8.
    cfg.model._undo_own_derivations()
    assert cfg.model.num_query_groups is None
    assert cfg.model.source_of("num_query_groups") == "CLI 'model.num_query_groups=null'"
    # And every later validate() starts from the user's null again.
    cfg.model.num_attention_heads = 2
    cfg.validate()
    assert cfg.model.num_query_groups == 2


def test_standalone_finalize_twice_keeps_an_explicit_none():
    p = Llama32ModelProvider1B(num_query_groups=None, num_attention_heads=4)
    p.finalize()
    p.finalize()
    assert p.num_query_groups == 4


@dataclasses.dataclass(kw_only=True)
class _TinyNamedProvider(LlamaModelProvider):
    """A small named size whose class default for num_query_groups (8) does not divide 4 heads."""

    # Kept out of ModelProvider.variants(): a test class must not add a short name or a class to
    # the public surface that other tests of the session enumerate.
    _abstract_config_ = True

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int | None = 128
    num_attention_heads: int = 8
    num_query_groups: int | None = 8
    share_embeddings_and_output_weights: bool = True
    make_vocab_size_divisible_by: int = 64


@pytest.mark.slow
def test_pretrain_runs_what_validate_accepted_with_an_explicit_null(tmp_path):
    from viaduct.testing import tiny_pretrain_config
    from viaduct.training.pretrain import pretrain

    cfg = tiny_pretrain_config("train.train_iters=1", "train.eval_iters=0")
    cfg.model = _TinyNamedProvider(seq_length=cfg.model.seq_length)
    apply_overrides(cfg, ["model.num_query_groups=null", "model.num_attention_heads=4"])
    cfg.validate()
    state = pretrain(cfg)  # provide() finalizes again: 4 heads must not meet the class's 8 groups
    assert state.train_state.step == 1
    assert cfg.model.num_query_groups == 4


@pytest.mark.parametrize(
    ("name", "cls", "seq_length"),
    [
        ("llama32_1b", Llama32ModelProvider1B, 8192),
        ("llama3_8b", Llama3ModelProvider8B, 8192),
        ("llama2_7b", Llama2ModelProvider7B, 4096),
        ("qwen25_500m", Qwen25ModelProvider500M, 4096),
        ("qwen3_600m", Qwen3ModelProvider600M, 4096),
        ("gpt2_124m", GPT2ModelProvider124M, 1024),
    ],
)
def test_recipes_use_the_named_providers(name, cls, seq_length):
    cfg = get_recipe(name)()
    assert type(cfg.model) is cls
    cfg.validate()
    assert cfg.model.seq_length == cfg.dataset.seq_length == seq_length
    assert cfg.tokenizer.vocab_size == cls().vocab_size
