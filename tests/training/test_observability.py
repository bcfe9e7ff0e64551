"""MLflow logging, nsys capture ranges and the NCCL flight-recorder environment."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

from viaduct.config import ConfigError
from viaduct.distributed.init import destroy_distributed, flight_recorder_env, initialize_distributed
from viaduct.recipes import get_recipe
from viaduct.training.config.distributed import DistributedInitConfig
from viaduct.training.config.logger import LoggerConfig
from viaduct.training.config.profiling import ProfilingConfig
from viaduct.training.logging import StepRecord, TrainingLogger, console
from viaduct.training.logging.training_logger import IntervalTiming
from viaduct.training.profiling import CudaProfilerApi, Profiler

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def restore_viaduct_logger():
    viaduct_logger = logging.getLogger("viaduct")
    handlers, level = list(viaduct_logger.handlers), viaduct_logger.level
    yield
    viaduct_logger.handlers[:] = handlers
    viaduct_logger.setLevel(level)
    console._active_bar = None


def make_cfg(**logger_fields):
    cfg = get_recipe("default")()
    cfg.logger.tensorboard_dir = cfg.checkpoint.save = cfg.checkpoint.load = None
    for name, value in logger_fields.items():
        setattr(cfg.logger, name, value)
    return cfg.validate(world_size=1)


def record(step: int, loss: float) -> StepRecord:
    return StepRecord(
        step=step,
        consumed_samples=16 * step,
        learning_rate=3e-4,
        decoupled_learning_rate=None,
        global_batch_size=16,
        losses={"lm loss": loss},
        grad_norm=1.5,
        num_zeros=None,
        params_norm=None,
        loss_scale=None,
        skipped=False,
        nan=False,
    )


def make_logger(cfg, *, rank: int = 0, world_size: int = 1) -> TrainingLogger:
    return TrainingLogger(
        cfg, rank=rank, world_size=world_size, train_iters=10, peak_flops_per_device=None, device=CPU
    )


# ------------------------------------------------------------------------------------------ MLflow


def test_mlflow_run_in_a_local_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    cfg = make_cfg(
        mlflow_experiment="viaduct-test",
        mlflow_run_name="smoke",
        mlflow_tracking_uri=uri,
        mlflow_tags={"team": "x"},
        mlflow_description="a smoke run",
    )
    lg = make_logger(cfg)
    lg.log_train([record(1, 2.5), record(2, 2.25)], IntervalTiming(2, 1.0, 2 * 16 * 256, 4e12, {}))
    lg.log_evaluation(2, 32, {"lm loss": 2.0}, split="validation")
    lg.close()
    lg.close()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("viaduct-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "smoke" and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "x" and run.data.tags["mlflow.note.content"] == "a smoke run"
    assert run.data.params["train.train_iters"] == str(cfg.train.train_iters)
    assert run.data.params["logger.mlflow_run_name"] == "smoke"
    history = client.get_metric_history(run.info.run_id, "lm loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.25)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "learning-rate")] == [1, 2]
    assert client.get_metric_history(run.info.run_id, "samples vs steps")[-1].value == 32
    assert client.get_metric_history(run.info.run_id, "lm loss validation")[0].value == 2.0
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_mlflow_only_on_the_last_rank_and_failed_status(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = make_cfg(mlflow_experiment="e", mlflow_run_name="r", mlflow_tracking_uri=uri)
    first = make_logger(cfg, rank=0, world_size=2)
    first.log_train([record(1, 2.0)], IntervalTiming(1, 1.0, 16 * 256, 4e12, {}))
    first.close()
    assert not (tmp_path / "mlruns").exists()  # rank 0 of 2 writes nothing
    last = make_logger(cfg, rank=1, world_size=2)
    last.log_train([record(1, 2.0)], IntervalTiming(1, 1.0, 16 * 256, 4e12, {}))
    try:
        raise RuntimeError("step failed")
    except RuntimeError:
        last.close()  # closed while the run's exception propagates
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert run.info.status == "FAILED"


def test_mlflow_rules():
    with pytest.raises(ConfigError) as err:
        LoggerConfig(mlflow_experiment="e").finalize()
    assert [p.path for p in err.value.problems] == ["mlflow_run_name"]
    with pytest.raises(ConfigError) as err:
        LoggerConfig(mlflow_run_name="r", mlflow_tags={"a": "b"}).finalize()
    assert {p.path for p in err.value.problems} == {"mlflow_run_name", "mlflow_tags"}
    assert "mlflow_experiment" in err.value.problems[0].message


def test_missing_mlflow_is_refused_by_validation_and_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        make_cfg(mlflow_experiment="e", mlflow_run_name="r")
    (problem,) = [p for p in err.value.problems if "mlflow" in p.path]
    assert problem.path == "logger.mlflow_experiment"
    assert 'pip install "viaduct[mlflow]"' in (problem.fix or "")


def comet_messages(offline_dir) -> list[dict]:
    import json
    import zipfile

    (archive,) = offline_dir.glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        return [json.loads(line) for line in z.read("messages.json").decode().splitlines() if line.strip()]


@pytest.mark.slow  # Comet archives the offline experiment when it ends (~2 s)
def test_comet_offline_experiment(tmp_path, monkeypatch):
    pytest.importorskip("comet_ml")
    offline = tmp_path / "comet"
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(offline))
    cfg = make_cfg(
        comet_project="viaduct-test",
        comet_experiment_name="smoke",
        comet_workspace="ws",
        comet_api_key="secret-key",
        comet_tags=["a"],
    )
    lg = make_logger(cfg)
    lg.log_train([record(1, 2.5), record(2, 2.25)], IntervalTiming(2, 1.0, 2 * 16 * 256, 4e12, {}))
    lg.log_evaluation(2, 32, {"lm loss": 2.0}, split="validation")
    lg.close()
    messages = comet_messages(offline)
    metrics = [m["payload"]["metric"] for m in messages if m["type"] == "metric_msg"]
    loss = [(m["step"], m["metricValue"]) for m in metrics if m["metricName"] == "lm loss"]
    assert loss == [(1, 2.5), (2, 2.25)]
    assert any(m["metricName"] == "lm loss validation" and m["step"] == 2 for m in metrics)
    assert any(m["metricName"] == "samples vs steps" for m in metrics)
    # Comet files list values under "params" and the others under "param".
    entries = [
        m["payload"].get("param") or m["payload"]["params"] for m in messages if m["type"] == "parameter_msg"
    ]
    params = {e["paramName"]: e["paramValue"] for e in entries}
    assert not any(m["type"] == "installed_packages" or "file_name" == m["type"] for m in messages)
    assert str(params["train.train_iters"]) == str(cfg.train.train_iters)
    assert params["logger.comet_api_key"] == "<hidden>"
    assert not any("secret-key" in json_line for json_line in map(str, messages))


def test_comet_rules(monkeypatch):
    with pytest.raises(ConfigError) as err:
        LoggerConfig(comet_project="p").finalize()
    assert [p.path for p in err.value.problems] == ["comet_experiment_name"]
    with pytest.raises(ConfigError) as err:
        LoggerConfig(comet_api_key="k").finalize()
    (problem,) = err.value.problems
    assert problem.path == "comet_api_key" and "k" not in repr(problem.value)
    monkeypatch.setitem(sys.modules, "comet_ml", None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        make_cfg(comet_project="p", comet_experiment_name="e")
    (problem,) = [p for p in err.value.problems if "comet" in p.path]
    assert problem.path == "logger.comet_project" and 'pip install "viaduct[comet]"' in (problem.fix or "")


# ------------------------------------------------------------------------------------------ nsys


class RecordingCudaApi(CudaProfilerApi):
    """Records the calls instead of making them, so the window logic runs without a GPU."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    def range_push(self, name: str) -> None:
        self.calls.append(f"push {name}")

    def range_pop(self) -> None:
        self.calls.append("pop")

    def autograd_ranges(self, record_shapes: bool):
        calls = self.calls

        class Ranges:
            def __enter__(self) -> None:
                calls.append(f"autograd on shapes={record_shapes}")

            def __exit__(self, *exc: object) -> None:
                calls.append("autograd off")

        return Ranges()


def nsys_profiler(rank: int, api: CudaProfilerApi, **fields) -> Profiler:
    cfg = ProfilingConfig(use_nsys_profiler=True, **fields)
    cfg.finalize()
    # The device is CUDA as far as the checks go; every CUDA call goes to `api`.
    return Profiler(cfg, rank=rank, trace_dir=None, device="cuda", world_size=4, cuda_api=api)


def run_steps(profiler: Profiler, first: int, last: int) -> None:
    with profiler:
        for step in range(first, last + 1):
            profiler.step_start(step)
            profiler.step_end(step)


def test_nsys_window_and_step_ranges_on_a_profiled_rank():
    api = RecordingCudaApi()
    run_steps(nsys_profiler(1, api, profile_step_start=3, profile_step_end=5, profile_ranks=[1]), 1, 8)
    assert api.calls == [
        "start",
        "autograd on shapes=False",
        "push step 3",
        "pop",
        "push step 4",
        "pop",
        "autograd off",
        "stop",
    ]


def test_nsys_other_ranks_resumed_runs_and_early_stops():
    api = RecordingCudaApi()
    run_steps(nsys_profiler(0, api, profile_ranks=[1]), 1, 20)
    assert api.calls == []  # rank 0 is not listed
    run_steps(nsys_profiler(0, api, profile_step_start=2, profile_step_end=4), 5, 9)
    assert api.calls == []  # resumed past the window
    profiler = nsys_profiler(0, api, profile_step_start=2, profile_step_end=10, record_shapes=True)
    run_steps(profiler, 1, 3)  # the run stops inside the window: close() still stops the capture
    assert api.calls == ["start", "autograd on shapes=True", "push step 2", "pop", "push step 3", "pop",
                         "autograd off", "stop"]  # fmt: skip


def test_nsys_is_refused_on_cpu_with_the_device_named():
    with pytest.raises(ConfigError) as err:
        Profiler(ProfilingConfig(use_nsys_profiler=True), rank=0, trace_dir=None, device=CPU)
    (problem,) = err.value.problems
    assert problem.path == "profiling.use_nsys_profiler" and "cpu" in problem.message


def test_nsys_rules():
    with pytest.raises(ConfigError):
        ProfilingConfig(use_nsys_profiler=True, use_pytorch_profiler=True).finalize()
    ProfilingConfig(use_nsys_profiler=True, record_shapes=True).finalize()  # shapes go into nsys's ranges
    problems = ProfilingConfig(use_nsys_profiler=True, profile_ranks=[5]).setting_problems(world_size=2)
    assert [p.path for p in problems] == ["profile_ranks"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_nsys_capture_range_runs_on_a_gpu():
    cfg = ProfilingConfig(use_nsys_profiler=True, profile_step_start=1, profile_step_end=2)
    profiler = Profiler(cfg, rank=0, trace_dir=None, device="cuda")
    x = torch.ones(8, device="cuda", requires_grad=True)
    with profiler:
        profiler.step_start(1)
        assert profiler.in_window
        (x * 2).sum().backward()
        profiler.step_end(1)
    assert not profiler.in_window


# --------------------------------------------------------------------------------- flight recorder


def test_flight_recorder_defaults_and_mapping(tmp_path):
    cfg = DistributedInitConfig()
    assert flight_recorder_env(cfg, {}) == {}  # off without a dump path
    env: dict[str, str] = {}
    cfg = DistributedInitConfig(flight_recorder_dump_path=str(tmp_path), flight_recorder_trace_buffer_size=64)
    flight_recorder_env(cfg, env)
    assert env == {
        "TORCH_FR_DUMP_TEMP_FILE": os.path.join(str(tmp_path), "_dump_"),  # a directory gets a file prefix
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(str(tmp_path), "_dump_"),
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "64",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_INCLUDE_STACK_TRACE": "0",
        "TORCH_INCLUDE_ONLY_ACTIVE": "1",
        "TORCH_NCCL_EXTRA_DUMP_ON_EXEC": "1",
    }


def test_flight_recorder_keeps_what_the_environment_already_says(caplog):
    env = {"TORCH_FR_DUMP_TEMP_FILE": "/from/env", "TORCH_NCCL_TRACE_BUFFER_SIZE": "9"}
    applied = flight_recorder_env(DistributedInitConfig(flight_recorder_dump_on_timeout=False), env)
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "9" and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in applied
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == "/from/env"  # the env's path turns it on
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"
    assert "already set" in caplog.text


def test_flight_recorder_rules():
    with pytest.raises(ConfigError) as err:
        DistributedInitConfig(flight_recorder_dump_path=" ", flight_recorder_trace_buffer_size=-1).finalize()
    assert {p.path for p in err.value.problems} == {
        "flight_recorder_dump_path",
        "flight_recorder_trace_buffer_size",
    }


def test_initialize_distributed_sets_the_environment_first(tmp_path, monkeypatch):
    for name in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_NCCL_TRACE_BUFFER_SIZE",
                 "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_INCLUDE_STACK_TRACE", "TORCH_INCLUDE_ONLY_ACTIVE",
                 "TORCH_NCCL_EXTRA_DUMP_ON_EXEC", "WORLD_SIZE", "RANK"):  # fmt: skip
        monkeypatch.setenv(name, "")  # recorded, so the variables set below are removed afterwards
        monkeypatch.delenv(name)
    ctx = initialize_distributed(DistributedInitConfig(flight_recorder_dump_path=str(tmp_path / "fr")))
    try:
        assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "fr")
        assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "2000"
    finally:
        destroy_distributed(ctx)


# ------------------------------------------------------------------------------- config validate


def test_config_validate_refuses_what_the_run_refuses(monkeypatch, capsys):
    from viaduct.cli.main import main

    monkeypatch.setitem(sys.modules, "comet_ml", None)  # as if not installed
    rc = main(
        [
            "config",
            "validate",
            "logger.mlflow_experiment=e",
            "logger.comet_project=p",
            "logger.comet_experiment_name=x",
            "dist.flight_recorder_trace_buffer_size=-1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "logger.mlflow_run_name" in err
    assert "viaduct[comet]" in err
    assert "dist.flight_recorder_trace_buffer_size" in err
    assert (
        main(["config", "validate", "profiling.use_nsys_profiler=true"]) == 0
    )  # the device is known at setup


@pytest.mark.slow
def test_pretrain_logs_to_mlflow_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from viaduct.testing import tiny_pretrain_config
    from viaduct.training.pretrain import pretrain

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = tiny_pretrain_config(
        "train.train_iters=4",
        "logger.log_interval=2",
        "logger.mlflow_experiment=e2e",
        "logger.mlflow_run_name=tiny",
        f"logger.mlflow_tracking_uri={uri}",
    )
    pretrain(cfg)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lm loss")] == [1, 2, 3, 4]
