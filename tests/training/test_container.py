import os

import pytest

from viaduct.config import ConfigError, ConfigWarning, DType, apply_overrides
from viaduct.models import GPTModelProvider
from viaduct.recipes import get_recipe, list_recipes, tiny_gpt_pretrain_config
from viaduct.training.comm_overlap import CommOverlapConfig
from viaduct.training.config import ConfigContainer, FinetuningDatasetConfig, TokenizerConfig


def tiny() -> ConfigContainer:
    return tiny_gpt_pretrain_config()


def test_validate_derives_topology_and_schedule():
    cfg = tiny().validate(world_size=2)
    assert cfg.world_size == 2 and cfg.data_parallel_size == 2
    assert cfg.num_microbatches == 16 // (8 * 2)
    assert cfg.scheduler.lr_decay_steps == 200 * 16 and cfg.scheduler.lr_warmup_steps == 20 * 16  # 10% warmup


def test_validate_is_idempotent_and_follows_edits():
    cfg = tiny()
    cfg.train.train_iters = 1000
    cfg.validate()
    assert cfg.scheduler.lr_decay_steps == 1000 * 16
    cfg.train.train_iters = 5000
    cfg.validate()
    assert cfg.scheduler.lr_decay_steps == 5000 * 16
    first = cfg.to_dict()
    cfg.validate()
    assert cfg.to_dict() == first
    cfg.model.hidden_size = 512
    cfg.model.ffn_hidden_size = None
    cfg.validate()
    assert cfg.model.ffn_hidden_size == 4 * 512


def test_world_size_from_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert tiny().validate().data_parallel_size == 2


def test_batch_size_rule_names_both_fields_and_numbers():
    cfg = tiny()
    cfg.train.global_batch_size = 24
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=2)
    (p,) = [p for p in info.value.problems if p.path == "train.global_batch_size"]
    assert "divisible by train.micro_batch_size × data-parallel size (8 × 2 = 16)" in p.message
    assert p.value == 24 and "16 or 32" in p.fix


def test_all_problems_reported_at_once_with_sources():
    cfg = tiny()
    apply_overrides(cfg, ["train.global_batch_size=24", "optimizer.lr=-1"])
    cfg.model.num_attention_heads = 3
    cfg.inprocess_restart = __import__(
        "viaduct.training.config", fromlist=["InProcessRestartConfig"]
    ).InProcessRestartConfig(max_rank_faults=2)
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=2)
    paths = {p.path for p in info.value.problems}
    assert {
        "train.global_batch_size",
        "model.num_attention_heads",
        "inprocess_restart.max_rank_faults",
    } <= paths
    text = str(info.value)
    assert "inprocess_restart.max_rank_faults: counting faults per rank is not supported yet" in text
    assert "CLI 'train.global_batch_size=24'" in text
    assert "test_container.py" in text  # the Python line that set num_attention_heads


def test_seq_length_has_one_owner():
    cfg = tiny()  # the dataset leaves seq_length unset: it follows the model
    cfg.validate()
    assert cfg.dataset.seq_length == cfg.model.seq_length == 256
    cfg.model.seq_length = 512
    cfg.validate()
    assert cfg.dataset.seq_length == 512
    cfg = tiny()
    cfg.model = GPTModelProvider(
        num_layers=2, hidden_size=64, num_attention_heads=4
    )  # seq_length left default
    cfg.dataset.seq_length = 128
    cfg.validate()
    assert cfg.model.seq_length == 128  # the side the user set wins
    cfg.model.seq_length = 64
    with pytest.raises(ConfigError, match="dataset.seq_length: conflicts with model.seq_length"):
        cfg.validate()


def test_exactly_one_of_train_iters_and_train_samples():
    cfg = tiny()
    cfg.train.train_samples = 1000
    with pytest.raises(ConfigError, match="train"):
        cfg.validate()
    cfg.train.train_iters = None
    cfg.scheduler.lr_warmup_iters = 0
    cfg.scheduler.lr_warmup_samples = 160
    cfg.scheduler.lr_warmup_fraction = None
    cfg.validate()
    assert cfg.train.effective_train_iters == 1000 // 16
    assert cfg.scheduler.lr_decay_steps == 1000 and cfg.scheduler.lr_warmup_steps == 160


def test_mixed_precision_recipe_applies_and_is_recomputed():
    cfg = tiny()
    cfg.mixed_precision = "bf16_mixed"
    cfg.validate()
    assert cfg.model.bf16 and cfg.model.params_dtype == DType("bf16") and cfg.optimizer.bf16
    assert cfg.ddp.grad_reduce_in_fp32
    cfg.mixed_precision = None
    cfg.validate()
    assert not cfg.model.bf16 and cfg.model.params_dtype == DType("fp32")
    cfg.mixed_precision = "bf16-mixed"  # hyphens work too
    cfg.validate()
    assert cfg.model.bf16


def test_mixed_precision_warns_when_it_overrides_a_user_value():
    cfg = tiny()
    cfg.model.params_dtype = "fp16"
    cfg.mixed_precision = "bf16_mixed"
    with pytest.warns(ConfigWarning, match="params_dtype"):
        cfg.validate()
    assert cfg.model.params_dtype == DType("bf16")
    cfg.mixed_precision = None  # the user's own value comes back
    cfg.validate()
    assert cfg.model.params_dtype == DType("fp16") and cfg.model.source_of("params_dtype").startswith(
        "python"
    )


def test_a_full_dump_reloaded_warns_only_about_values_that_differ_from_the_default(tmp_path):
    """`viaduct config show > run.yaml` repeats every default; reloading it must not warn about those."""
    import warnings

    dumped = tmp_path / "run.yaml"
    dumped.write_text(get_recipe("llama32_1b")().to_yaml())  # bf16_mixed, dumped before validation
    cfg = ConfigContainer.from_yaml(dumped)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cfg.validate()
    assert cfg.model.params_dtype == DType("bf16")

    text = dumped.read_text()
    assert text.count("_target_: torch.float32") > 1
    # A value the user changed in the file is still reported (the model's params_dtype comes first).
    dumped.write_text(text.replace("_target_: torch.float32", "_target_: torch.float16", 1))
    with pytest.warns(ConfigWarning, match="model.params_dtype=torch.float16"):
        ConfigContainer.from_yaml(dumped).validate()


def test_unknown_mixed_precision_recipe():
    cfg = tiny()
    cfg.mixed_precision = "bf16_mixd"
    with pytest.raises(ConfigError, match="mixed_precision.*bf16_mixed"):
        cfg.validate()


def test_peft_needs_a_pretrained_checkpoint(tmp_path):
    cfg = apply_overrides(tiny(), ["peft=lora"])
    with pytest.raises(
        ConfigError, match="peft: fine-tuning with PEFT needs base weights.*pretrained_checkpoint"
    ):
        cfg.validate()
    (tmp_path / "base").mkdir()
    cfg.checkpoint.pretrained_checkpoint = str(tmp_path / "base")
    cfg.validate()  # with base weights, LoRA on the default targets runs


def test_peft_refuses_what_the_run_cannot_honour(tmp_path):
    (tmp_path / "base").mkdir()
    cfg = apply_overrides(
        tiny(),
        [
            "peft=lora",
            f"checkpoint.pretrained_checkpoint={tmp_path / 'base'}",
            "peft.target_modules=[linear_qkv,'*.layers.7.*']",
            f"checkpoint.save={tmp_path / 'out'}",
            "checkpoint.also_save_hf_checkpoint=true",
        ],
    )
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    found = {(p.path, p.message.split(",")[0]) for p in info.value.problems}
    # Targets are matched on the whole model when the config is validated (not on one pipeline stage).
    assert ("peft.target_modules[1]", "matches no linear layer of the model") in found
    assert any(path == "checkpoint.also_save_hf_checkpoint" for path, _ in found)


def test_peft_must_give_every_pipeline_rank_adapters(tmp_path):
    (tmp_path / "base").mkdir()
    cfg = apply_overrides(
        tiny(),
        [
            "peft=lora",
            f"checkpoint.pretrained_checkpoint={tmp_path / 'base'}",
            "peft.target_modules=['*.layers.0.*']",
            "model.pipeline_model_parallel_size=2",
        ],
    )
    with pytest.raises(
        ConfigError, match=r"peft.target_modules: adapts no layer held by pipeline rank\(s\) \[1\]"
    ):
        cfg.validate(world_size=2)
    cfg.peft.target_modules = ["linear_qkv"]
    cfg.validate(world_size=2)


def test_missing_pretrained_checkpoint_is_an_error():
    cfg = tiny()
    cfg.checkpoint.pretrained_checkpoint = "/no/such/checkpoint"
    with pytest.raises(ConfigError, match="checkpoint.pretrained_checkpoint"):
        cfg.validate()


def test_save_interval_needs_save():
    cfg = tiny()
    cfg.checkpoint.save = None  # the recipe saves into ./runs/tiny_gpt
    cfg.checkpoint.save_interval = 10
    with pytest.raises(ConfigError, match="checkpoint.save_interval"):
        cfg.validate()


def test_expert_parallel_size_is_not_supported_yet_pipeline_parallel_size_is():
    cfg = tiny()
    cfg.model.pipeline_model_parallel_size = 2
    cfg.model.expert_model_parallel_size = 2
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=4)
    assert "expert parallelism is not supported yet" in str(info.value)
    assert not [p for p in info.value.problems if p.path == "model.pipeline_model_parallel_size"]


def test_tensor_and_context_parallel_layouts_validate_with_their_rules():
    cfg = tiny()
    cfg.model.tensor_model_parallel_size = 2
    cfg.model.context_parallel_size = 2
    cfg.validate(world_size=8)
    assert cfg.data_parallel_size == 2
    cfg.model.num_query_groups = 1  # one key/value head cannot be split over 2 ranks
    cfg.model.seq_length = cfg.dataset.seq_length = 30  # not 4 equal chunks for 2 context-parallel ranks
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=8)
    text = str(info.value)
    assert "1 query groups (key/value heads) (model.num_query_groups) cannot be split evenly over 2" in text
    assert "seq_length 30 is not divisible by 4" in text


def test_layout_rules_spanning_components():
    cfg = tiny()
    cfg.train.global_batch_size = 32
    cfg.ddp.num_distributed_optimizer_instances = 2
    cfg.ddp.overlap_param_gather = True
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=4)
    text = str(info.value)
    assert "ddp.num_distributed_optimizer_instances: hybrid sharding needs sharded data parallelism" in text
    assert "ddp.overlap_param_gather: prefetches sharded parameters" in text
    cfg.ddp.use_distributed_optimizer = True
    cfg.ddp.num_distributed_optimizer_instances = 3
    cfg.checkpoint.ckpt_format = "torch"
    cfg.train.torch_compile_scope = "model"
    cfg.model.tensor_model_parallel_size = 2
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=4)
    text = str(info.value)
    assert "must divide the data-parallel size (2)" in text
    assert "checkpoint.ckpt_format: 'torch' writes one file of whole tensors" in text
    assert "train.torch_compile_scope" in text
    cfg.ddp.num_distributed_optimizer_instances = 2
    cfg.checkpoint.ckpt_format = "torch_dist"
    cfg.train.torch_compile_scope = None
    cfg.validate(world_size=4)


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_recipe_validates_and_round_trips(name, tmp_path):
    cfg = get_recipe(name)()
    base = cfg.checkpoint.pretrained_checkpoint
    if isinstance(cfg.dataset, FinetuningDatasetConfig) and not (base and os.path.exists(base)):
        # A fine-tuning recipe is given its base (whose tokenizer it follows, for a Hugging Face one).
        cfg.checkpoint.pretrained_checkpoint = str(tmp_path)
        if cfg.tokenizer.tokenizer_type is None:
            cfg.tokenizer = TokenizerConfig(
                tokenizer_type="NullTokenizer", vocab_size=cfg.model.vocab_size - 1
            )
    path = tmp_path / "r.yaml"
    cfg.to_yaml(path)
    assert ConfigContainer.from_yaml(path) == cfg
    # Two data-parallel replicas of whatever model-parallel group the recipe sets.
    m = cfg.model
    world = 2 * m.tensor_model_parallel_size * m.context_parallel_size * m.pipeline_model_parallel_size
    cfg.validate(world_size=world)
    cfg.to_yaml(path)
    back = ConfigContainer.from_yaml(path)
    assert back == cfg
    back.validate(world_size=world)
    assert back.to_dict() == cfg.to_dict()


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ConfigError, match="no such recipe.*did you mean llama32_1b.*known recipes"):
        get_recipe("llama32_1")


def test_non_default_values():
    values = tiny().log_non_default_values()
    assert values["model.num_layers"] == 4 and "model.layernorm_epsilon" not in values


def test_container_with_every_optional_component_round_trips(tmp_path):
    from viaduct.peft import LoRA
    from viaduct.training.comm_overlap import CommOverlapConfig
    from viaduct.training.config import (
        FaultToleranceConfig,
        InProcessRestartConfig,
        NVRxStragglerDetectionConfig,
        ProfilingConfig,
        StragglerDetectionConfig,
    )
    from viaduct.training.mixed_precision import get_mixed_precision_config

    cfg = tiny()
    cfg.mixed_precision = get_mixed_precision_config("bf16_mixed")
    cfg.comm_overlap = CommOverlapConfig()
    cfg.peft = LoRA(dim=8, alpha=16, target_modules=["linear_qkv"])
    cfg.profiling = ProfilingConfig(use_pytorch_profiler=True)
    cfg.ft = FaultToleranceConfig()
    cfg.straggler = StragglerDetectionConfig()
    cfg.nvrx_straggler = NVRxStragglerDetectionConfig()
    cfg.inprocess_restart = InProcessRestartConfig()
    path = tmp_path / "all.yaml"
    cfg.to_yaml(path)
    back = ConfigContainer.from_yaml(path)
    assert back == cfg
    assert isinstance(back.peft, LoRA) and back.peft.target_modules == ["linear_qkv"]
    assert back.to_yaml() == cfg.to_yaml()


def test_megatron_bridge_yaml_loads(tmp_path):
    """Bridge's `_target_` paths map onto viaduct's classes; keys of left-out fields are dropped, loudly."""
    text = tiny().to_yaml()
    for ours, theirs in [
        (
            "viaduct.training.config.container.ConfigContainer",
            "megatron.bridge.training.config.ConfigContainer",
        ),
        ("viaduct.training.config.train.TrainingConfig", "megatron.bridge.training.config.TrainingConfig"),
        (
            "viaduct.models.gpt.provider.GPTModelProvider",
            "megatron.bridge.models.gpt_provider.GPTModelProvider",
        ),
        ("viaduct.models.enums.AttnBackend", "megatron.core.transformer.enums.AttnBackend"),
    ]:
        assert ours in text
        text = text.replace(ours, theirs)
    text = text.replace(
        "model:\n",
        "model:\n  transformer_layer_spec:\n"
        "    _target_: megatron.bridge.models.gpt_provider.default_layer_spec\n"
        "    _call_: false\n",
        1,
    )
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    with pytest.warns(ConfigWarning, match="model.transformer_layer_spec"):
        cfg = ConfigContainer.from_yaml(path)
    assert cfg == tiny()


def test_tp_comm_overlap_lands_on_the_model_and_needs_sequence_parallel_and_compile():
    cfg = tiny()
    cfg.comm_overlap = CommOverlapConfig(tp_comm_overlap=True)
    cfg.model.tensor_model_parallel_size = 2
    cfg.train.torch_compile = False
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=2)
    text = str(info.value)
    assert "model.tp_comm_overlap: overlaps the all-gathers and reduce-scatters" in text
    assert "(got True, from derived (comm_overlap.tp_comm_overlap))" in text
    cfg.model.sequence_parallel = True
    with pytest.raises(ConfigError, match="asynchronous tensor parallelism is a torch.compile pass"):
        cfg.validate(world_size=2)
    cfg.train.torch_compile = None
    cfg.validate(world_size=2)
    assert cfg.model.tp_comm_overlap is True
