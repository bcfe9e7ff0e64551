"""`viaduct config validate` refuses exactly what a run refuses, with the same message.

Every configuration rule lives in `ConfigContainer.validate()`: `pretrain()` only calls it, so a
setting the loop cannot run is refused by `cfg.validate()`, by `pretrain(cfg)` and by the
`viaduct config validate` command alike.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest

from viaduct.config import ConfigError, ConfigWarning, apply_overrides
from viaduct.models import GPTModelProvider, ModelProvider
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.training.config import ConfigContainer, DataloaderConfig
from viaduct.training.pretrain import pretrain

# Settings the training loop cannot run, as CLI overrides on the default recipe, with the field
# the refusal names and the rule it states.
REFUSED = [
    ("peft=lora", "peft", "fine-tuning with PEFT needs base weights"),
    (
        "peft={_target_: viaduct.peft.LoRA, target_modules: ['*.layers.9.*']}",
        "peft.target_modules[0]",
        "matches no linear layer of the model",
    ),
    ("dataset.dataloader_type=batch", "dataset.dataloader_type", "batch is not supported yet"),
    ("dataset.dataloader_type=external", "dataset.dataloader_type", "external is not supported yet"),
    ("dataset=finetuning", "dataset.dataset_root", "must name the directory of training.jsonl"),
    ("dataset=mock_t5", "dataset", "T5 span-corruption data trains T5 models"),
    ("model=t5", "dataset", "a T5 model trains on span-corruption data"),
    ("dataset.trust_remote_code=true", "dataset.trust_remote_code", "is not supported yet"),
    ("model.tensor_model_parallel_size=3", "model.tensor_model_parallel_size", "4 attention heads"),
    (
        "model.pipeline_model_parallel_size=2",
        "model.pipeline_model_parallel_size",
        "world size 1 is not divisible by tensor × pipeline × context parallel size",
    ),
    ("model.context_parallel_size=3", "model.context_parallel_size", "is not divisible by 6"),
    ("model.expert_model_parallel_size=2", "model.expert_model_parallel_size", "is not supported yet"),
    (
        "model.virtual_pipeline_model_parallel_size=2",
        "model.virtual_pipeline_model_parallel_size",
        "virtual pipeline parallelism",
    ),
    ("train.exit_signal=SIGKILL", "train.exit_signal", "SIGKILL cannot be caught"),
    ("train.exit_signal=SIGSTOP", "train.exit_signal", "SIGSTOP cannot be caught"),
    ("profiling.record_shapes=true", "profiling.record_shapes", "only adds shapes to NVTX ranges"),
    (
        "profiling.pytorch_profiler_collect_callstack=true",
        "profiling.pytorch_profiler_collect_callstack",
        "applies to torch.profiler traces",
    ),
    ("env_vars={'A=B': 1}", "env_vars", "is not an environment variable name"),
]


def _problem_line(problems: list, path: str, rule: str) -> str:
    """The one problem at `path` stating `rule`, rendered as the CLI prints it."""
    found = [p for p in problems if p.path == path and rule in p.message]
    assert len(found) == 1, [str(p) for p in problems]
    return f"{found[0].path}: {found[0].message}"


@pytest.mark.parametrize(("override", "path", "rule"), REFUSED, ids=[r[0] for r in REFUSED])
def test_validate_and_pretrain_refuse_the_same(override: str, path: str, rule: str) -> None:
    cfg = apply_overrides(tiny_gpt_pretrain_config(), [override])
    with pytest.raises(ConfigError) as by_validate:
        cfg.validate()
    expected = _problem_line(by_validate.value.problems, path, rule)
    with pytest.raises(ConfigError) as by_run:
        pretrain(apply_overrides(tiny_gpt_pretrain_config(), [override]))
    assert _problem_line(by_run.value.problems, path, rule) == expected


@pytest.mark.slow
@pytest.mark.parametrize(("override", "path", "rule"), REFUSED, ids=[r[0] for r in REFUSED])
def test_cli_validate_refuses_with_the_same_message(override: str, path: str, rule: str) -> None:
    cfg = apply_overrides(tiny_gpt_pretrain_config(), [override])
    with pytest.raises(ConfigError) as by_validate:
        cfg.validate()
    expected = _problem_line(by_validate.value.problems, path, rule)
    r = subprocess.run(
        [sys.executable, "-m", "viaduct", "config", "validate", override],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr


def test_profiled_ranks_must_exist_in_the_world() -> None:
    cfg = apply_overrides(
        tiny_gpt_pretrain_config(),
        ["profiling.use_pytorch_profiler=true", "profiling.profile_ranks=[0,3]", "train.micro_batch_size=4"],
    )
    cfg.validate(world_size=4)
    with pytest.raises(ConfigError) as info:
        cfg.validate(world_size=2)
    (p,) = info.value.problems
    assert p.path == "profiling.profile_ranks" and "[3] do not exist: the world size is 2" in p.message


def test_an_uncatchable_signal_is_fine_when_no_handler_uses_it() -> None:
    cfg = apply_overrides(
        tiny_gpt_pretrain_config(), ["train.exit_signal=SIGKILL", "train.exit_signal_handler=false"]
    )
    cfg.validate()
    cfg.train.exit_signal_handler_for_dataloader = True  # the data-loader workers would install it
    with pytest.raises(ConfigError, match="train.exit_signal: SIGKILL cannot be caught"):
        cfg.validate()


@dataclass(kw_only=True)
class _EncoderDecoderProvider(ModelProvider):
    """A provider family the training loop does not build."""

    # Kept out of ModelProvider.variants(), which other tests of the session enumerate.
    _abstract_config_ = True


@dataclass(kw_only=True)
class _CustomDataset(DataloaderConfig):
    """A dataset kind the training loop does not build."""

    _abstract_config_ = True  # kept out of DataloaderConfig.variants(), as above


def test_only_gpt_models_and_datasets_are_run() -> None:
    cfg = tiny_gpt_pretrain_config()
    shape = {n: getattr(cfg.model, n) for n in ("num_layers", "hidden_size", "num_attention_heads")}
    cfg.model = _EncoderDecoderProvider(**shape)
    cfg.dataset = _CustomDataset()
    with pytest.raises(ConfigError) as by_validate:
        cfg.validate()
    lines = {f"{p.path}: {p.message}" for p in by_validate.value.problems}
    assert "model: only GPT models can be trained yet" in lines
    assert (
        "dataset: only GPT datasets (indexed or mock) and fine-tuning datasets can be trained on yet" in lines
    )
    with pytest.raises(ConfigError) as by_run:
        pretrain(cfg)
    assert lines == {f"{p.path}: {p.message}" for p in by_run.value.problems}
    assert isinstance(tiny_gpt_pretrain_config().model, GPTModelProvider)


# ------------------------------------------------------------------ nothing to evaluate on


def _warnings_of(cfg: ConfigContainer) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg.validate()
    return [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


def test_a_split_without_validation_data_warns_when_evaluation_is_asked() -> None:
    cfg = apply_overrides(tiny_gpt_pretrain_config(), ["dataset.split='100,0,0'"])
    (text,) = [w for w in _warnings_of(cfg) if "dataset.split" in w]
    assert "dataset.split='100,0,0' leaves the validation and test splits empty" in text
    assert "train.eval_iters=5" in text and "every 50 steps (train.eval_interval)" in text
    assert "give validation a share in dataset.split" in text and "train.eval_iters=0" in text

    only_validation = apply_overrides(tiny_gpt_pretrain_config(), ["dataset.split='99,0,1'"])
    (text,) = [w for w in _warnings_of(only_validation) if "dataset.split" in w]
    assert "leaves the validation split empty" in text and "no validation evaluation" in text


def test_no_warning_when_evaluation_has_data_or_is_off() -> None:
    # Megatron's usual "99,1,0" evaluates on validation data; leaving out the test pass is a choice.
    assert not [
        w
        for w in _warnings_of(apply_overrides(tiny_gpt_pretrain_config(), ["dataset.split='99,1,0'"]))
        if "split" in w
    ]
    off = apply_overrides(tiny_gpt_pretrain_config(), ["dataset.split='100,0,0'", "train.eval_iters=0"])
    assert not [w for w in _warnings_of(off) if "split" in w]


def test_blend_per_split_without_validation_data_warns() -> None:
    cfg = apply_overrides(
        tiny_gpt_pretrain_config(),
        ["~dataset.data_path", "~dataset.split", "dataset.blend_per_split=[[[a], null], null, null]"],
    )
    (text,) = [w for w in _warnings_of(cfg) if "blend_per_split" in w]
    assert "leaves the validation and test splits empty" in text
    assert "dataset.blend_per_split[1]" in text
