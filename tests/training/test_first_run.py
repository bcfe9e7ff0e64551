"""The first run: `viaduct pretrain` puts everything in one run directory, ends by saying where it
is and what to do next, and draws the loss curves into a self-contained HTML page (`viaduct plot`)."""

from __future__ import annotations

import io
import os
import re
import shlex
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from viaduct.cli.main import main
from viaduct.recipes import tiny_gpt_pretrain_config
from viaduct.testing import run_viaduct, tiny_pretrain_config, torchrun_viaduct
from viaduct.training import curves as curves_mod
from viaduct.training import run_report
from viaduct.training.curves import PLOT_FILE, read_curves, write_plot
from viaduct.training.run_report import draw_curves, run_paths

SHORT = ("train.train_iters=2", "train.global_batch_size=8", "logger.log_interval=1", "train.eval_iters=1")


def _cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return run_viaduct(*args, cwd=cwd, timeout=timeout)


def _suggested(out: str, label: str) -> list[str]:
    """The command of a closing line ("  train further     viaduct pretrain ...  (resumes ...)")."""
    m = re.search(rf"^  {label}\s+(viaduct .*?)(?:  \(.*)?$", out, re.M)
    assert m, f"no {label!r} line in:\n{out[-3000:]}"
    return shlex.split(m.group(1))


def _polylines(page: str) -> dict[str, tuple[str, list[tuple[float, float]]]]:
    """series -> (class, [(x, y)...]) of every polyline in the page."""
    found = {}
    for attrs in re.findall(r"<polyline ([^>]*)/>", page):
        series = re.search(r'data-series="([^"]*)"', attrs).group(1)
        cls = re.search(r'class="([^"]*)"', attrs).group(1)
        pts = re.search(r'\spoints="([^"]*)"', attrs).group(1).split()
        assert int(re.search(r'data-points="(\d+)"', attrs).group(1)) == len(pts)
        found[series] = (cls, [tuple(map(float, p.split(","))) for p in pts])
    return found


def _svgs(page: str) -> list[ET.Element]:
    """Every inline SVG of the page, parsed as XML (so each one is well formed)."""
    return [ET.fromstring(svg) for svg in re.findall(r"<svg .*?</svg>", page, re.S)]


def _write_events(directory: Path, scalars: dict[str, list[tuple[int, float]]], name: str) -> Path:
    """A real event file (written by torch's SummaryWriter), renamed to `name` (names set the order)."""
    from torch.utils.tensorboard import SummaryWriter

    scratch = directory / f".writer-{name}"
    w = SummaryWriter(log_dir=str(scratch))
    for tag, points in scalars.items():
        for step, value in points:
            w.add_scalar(tag, value, step)
    w.close()
    (written,) = scratch.iterdir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    written.rename(target)
    scratch.rmdir()
    return target


def _plot(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["plot", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --------------------------------------------------------------------------- the run directory


def test_default_recipe_keeps_its_outputs_in_one_run_directory() -> None:
    cfg = tiny_gpt_pretrain_config()
    run = os.path.join("./runs", "tiny_gpt")
    assert cfg.checkpoint.save == cfg.checkpoint.load == os.path.join(run, "checkpoints")
    assert cfg.logger.tensorboard_dir == os.path.join(run, "tb_logs")
    # The same rule as the recipe keywords: dir/name give the same paths for the same directory.
    same = tiny_gpt_pretrain_config(dir="./runs", name="tiny_gpt")
    assert (same.checkpoint.save, same.logger.tensorboard_dir) == (
        cfg.checkpoint.save,
        cfg.logger.tensorboard_dir,
    )
    paths = run_paths(cfg)
    assert paths.run_dir == os.path.normpath(run)
    assert paths.plot == os.path.join(os.path.normpath(run), PLOT_FILE)
    # Test configurations built on the recipe write nothing into a shared ./runs.
    tiny = tiny_pretrain_config()
    assert (
        tiny.checkpoint.save is None and tiny.checkpoint.load is None and tiny.logger.tensorboard_dir is None
    )


def test_run_paths_outside_the_recipe_layout_name_no_run_directory(tmp_path: Path) -> None:
    cfg = tiny_pretrain_config(f"checkpoint.save={tmp_path}/ckpt", f"logger.tensorboard_dir={tmp_path}/tb")
    paths = run_paths(cfg)
    assert paths.run_dir is None
    assert paths.plot == os.path.join(str(tmp_path), "tb", PLOT_FILE)  # inside the event directory


def test_command_suggestions_drop_the_settings_they_replace() -> None:
    args = ["viaduct", "pretrain", "--train.train-iters", "20", "+train.train_iters=3", "optimizer.lr=1e-3"]
    assert run_report._without(args, ["train.train_iters"]) == ["viaduct", "pretrain", "optimizer.lr=1e-3"]
    args = ["viaduct", "pretrain", "--train.train_iters=5", "checkpoint.load=x", "--train.eval-iters", "2"]
    assert run_report._without(args, ["train.train_iters", "checkpoint.load"]) == [
        "viaduct",
        "pretrain",
        "--train.eval-iters",
        "2",
    ]


@pytest.mark.slow
def test_default_run_layout_last_lines_and_the_commands_they_suggest(tmp_path: Path) -> None:
    """The README command in an empty directory, then the command it suggests, then the README
    command again: every suggested command runs as printed."""
    first = _cli("pretrain", *SHORT, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_gpt"
    assert sorted(os.listdir(tmp_path)) == ["runs"]
    assert sorted(os.listdir(run)) == ["checkpoints", PLOT_FILE, "tb_logs"]
    assert (run / "checkpoints" / "iter_0000002").is_dir()
    assert any("tfevents" in f for f in os.listdir(run / "tb_logs"))

    tail = first.stdout.rstrip().splitlines()[-13:]
    assert tail[0] == "-" * 100 and tail[-1] == "-" * 100
    assert tail[1].startswith("run finished at iteration 2 of 2 (training lm loss ")
    assert ", validation lm loss " in tail[1] and ", test lm loss " in tail[1]
    body = "\n".join(tail)
    for line in (
        "  run directory     runs/tiny_gpt",
        "  checkpoint        runs/tiny_gpt/checkpoints/iter_0000002",
        "  TensorBoard logs  runs/tiny_gpt/tb_logs",
        "  loss curves       runs/tiny_gpt/loss_curves.html (open it in a browser)",
        "  look at curves    tensorboard --logdir runs/tiny_gpt/tb_logs",
        "  redraw the plot   viaduct plot runs/tiny_gpt",
    ):
        assert line in tail, body
    further = _suggested(body, "train further")
    assert further == ["viaduct", "pretrain", *SHORT[1:], "train.train_iters=4"]
    # "write text", exactly as printed: the model just trained writes after the prompt.
    write = _suggested(body, "write text")
    assert write[:4] == ["viaduct", "generate", "--checkpoint", "runs/tiny_gpt/checkpoints"]
    text = _cli(*write[1:], "--max-new-tokens", "4", cwd=tmp_path)
    assert text.returncode == 0, text.stderr[-3000:]
    assert "The" in text.stdout
    assert _suggested(body, "start afresh")[-3:] == [
        "checkpoint.save=runs/tiny_gpt_2/checkpoints",
        "checkpoint.load=runs/tiny_gpt_2/checkpoints",
        "logger.tensorboard_dir=runs/tiny_gpt_2/tb_logs",
    ]

    # "train further", exactly as printed, resumes at iteration 2 and trains to 4.
    second = _cli(*further[1:], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "at iteration 2 (model, optimizer" in out and "iteration        4/       4" in out
    assert "run finished at iteration 4 of 4" in second.stdout
    page = (run / PLOT_FILE).read_text()
    assert len(_polylines(page)["lm loss"][1]) == 4  # both jobs' steps, redrawn at the end

    # The same command again: the run there has finished; it trains nothing, says so and exits 0.
    third = _cli(*further[1:], cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "iteration        5/" not in third.stdout + third.stderr
    assert (
        "nothing to train: the checkpoint in runs/tiny_gpt/checkpoints is already at iteration 4 of 4"
        in third.stdout
    )
    assert _suggested(third.stdout, "train further")[-1] == "train.train_iters=8"


@pytest.mark.slow
def test_last_lines_with_saving_and_tensorboard_off(tmp_path: Path) -> None:
    off = ("checkpoint.save=null", "checkpoint.load=null", "logger.tensorboard_dir=null")
    proc = _cli("pretrain", *SHORT, *off, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp_path) == []
    tail = proc.stdout.rstrip().splitlines()[-5:]
    assert tail[1].startswith("run finished at iteration 2 of 2")
    assert tail[2] == "  checkpoint        not saved (set checkpoint.save to keep the weights and resume)"
    assert tail[3] == "  TensorBoard logs  off (set logger.tensorboard_dir to record the curves)"
    for misleading in ("run directory", "loss curves", "tensorboard --logdir", "train further", "next:"):
        assert misleading not in proc.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_prints_the_last_lines_once_and_draws_the_curves(tmp_path: Path) -> None:
    yaml = tmp_path / "tiny.yaml"
    tiny_pretrain_config().to_yaml(yaml)
    proc = torchrun_viaduct(
        2,
        "pretrain",
        "--config-file",
        str(yaml),
        "train.train_iters=2",
        "train.eval_iters=1",
        "train.eval_interval=2",
        "checkpoint.save=run/checkpoints",
        "logger.tensorboard_dir=run/tb_logs",
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("run finished at iteration 2 of 2") == 1
    assert "next: (launch under torchrun as this run was)" in out
    assert "checkpoint.load=run/checkpoints train.train_iters=4" in out  # the tiny config loads nothing
    page = (tmp_path / "run" / PLOT_FILE).read_text()
    assert len(_polylines(page)["lm loss"][1]) == 2


# --------------------------------------------------------------------------- viaduct plot


@pytest.mark.slow
def test_plot_of_a_real_run_has_a_point_per_logged_step(tmp_path: Path, capsys) -> None:
    from viaduct.training.pretrain import pretrain

    run = tmp_path / "run"
    cfg = tiny_pretrain_config(
        "train.train_iters=6",
        "train.eval_interval=3",
        "logger.log_interval=3",
        f"logger.tensorboard_dir={run / 'tb_logs'}",
    )
    state = pretrain(cfg)
    capsys.readouterr()
    # The closing lines take the last validation loss from the curves when the loop's own
    # evaluation was the last one (iteration 6 is an eval_interval step).
    buf = io.StringIO()
    run_report.report_run(cfg, state, command=["viaduct", "pretrain"], resumed_from=None, out=buf)
    ea = EventAccumulator(str(run / "tb_logs"))
    ea.Reload()
    last = {tag: ea.Scalars(tag)[-1].value for tag in ("lm loss", "lm loss validation")}
    headline = buf.getvalue().splitlines()[2]
    assert headline.startswith(
        f"run finished at iteration 6 of 6 (training lm loss {last['lm loss']:.4g}, "
        f"validation lm loss {last['lm loss validation']:.4g}, test lm loss "
    ), headline
    assert "  checkpoint        not saved (set checkpoint.save" in buf.getvalue()
    assert "train further" not in buf.getvalue()  # nothing saved to train further from
    assert f"  redraw the plot   viaduct plot {run}" in buf.getvalue()

    rc, out, err = _plot(str(run), "--output", str(tmp_path / "curves.html"), capsys=capsys)
    assert rc == 0, err
    assert out.startswith(
        f"wrote {tmp_path / 'curves.html'}: lm loss (6 points), lm loss validation (2 points)"
    )
    page = (tmp_path / "curves.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    svgs = _svgs(page)
    assert len(svgs) == 2  # loss, learning rate
    lines = _polylines(page)
    for series, cls in (
        ("lm loss", "training"),
        ("lm loss validation", "validation"),
        ("learning-rate", "learning-rate"),
    ):
        assert lines[series][0] == cls
        assert len(lines[series][1]) == len(ea.Scalars(series)), series
        xs = [x for x, _ in lines[series][1]]
        assert xs == sorted(xs)
    assert len(lines["lm loss"][1]) == 6 and len(lines["lm loss validation"][1]) == 2
    assert page.count("<circle") == 2  # the validation points are marked
    # SVG y grows downwards: the lowest loss has the largest y.
    values = [e.value for e in ea.Scalars("lm loss")]
    ys = [y for _, y in lines["lm loss"][1]]
    assert ys.index(max(ys)) == values.index(min(values))

    # Without --output the page goes into the run directory, as at the end of `viaduct pretrain`.
    rc, _, err = _plot(str(run), capsys=capsys)
    assert rc == 0, err
    assert (run / PLOT_FILE).is_file()


def test_plot_of_a_missing_or_empty_directory_is_a_clear_error(tmp_path: Path, capsys) -> None:
    rc, _, err = _plot(str(tmp_path / "nowhere"), capsys=capsys)
    assert rc == 2
    assert "no such file or directory" in err and "nowhere" in err and "Traceback" not in err
    (tmp_path / "empty" / "tb_logs").mkdir(parents=True)
    rc, _, err = _plot(str(tmp_path / "empty"), capsys=capsys)
    assert rc == 2
    assert "holds no TensorBoard event files" in err and "logger.tensorboard_dir" in err


def test_plot_of_damaged_event_files_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    good = _write_events(
        tmp_path / "good" / "tb_logs",
        {"lm loss": [(i, 5.0 - i / 10) for i in range(1, 31)]},
        "events.out.tfevents.1",
    )
    data = good.read_bytes()

    def frame(payload: bytes) -> bytes:
        head = struct.pack("<Q", len(payload))
        return (
            head
            + struct.pack("<I", masked_crc32c(head))
            + payload
            + struct.pack("<I", masked_crc32c(payload))
        )

    head = struct.pack("<Q", 2**62)
    cases = {
        "flipped": (data[:400] + bytes([data[400] ^ 0xFF]) + data[401:], "fails its checksum"),
        "garbage": (b"not an event file" * 50, "record 1 fails its checksum"),
        "not-an-event": (data + frame(b"\xff\xff\xff\xff"), "is not a TensorBoard event"),
        "huge-length": (
            data + head + struct.pack("<I", masked_crc32c(head)) + b"x" * 16,
            "impossible length",
        ),
    }
    for name, (content, expected) in cases.items():
        d = tmp_path / name / "tb_logs"
        d.mkdir(parents=True)
        (d / "events.out.tfevents.1").write_bytes(content)
        rc, _, err = _plot(str(tmp_path / name), capsys=capsys)
        assert rc == 2, name
        assert expected in err and "events.out.tfevents.1" in err and "Traceback" not in err, (name, err)
        assert not (tmp_path / name / PLOT_FILE).exists()

    # A last record cut short is what a killed writer leaves: the rest is drawn, with a note.
    d = tmp_path / "cut" / "tb_logs"
    d.mkdir(parents=True)
    (d / "events.out.tfevents.1").write_bytes(data[:-7])
    rc, out, err = _plot(str(tmp_path / "cut"), capsys=capsys)
    assert rc == 0, err
    assert "lm loss (29 points)" in out and "is incomplete" in err

    # Event files with no loss in them: nothing to plot, said so.
    _write_events(tmp_path / "noloss", {"grad-norm": [(1, 1.0)]}, "events.out.tfevents.1")
    rc, _, err = _plot(str(tmp_path / "noloss"), capsys=capsys)
    assert rc == 2 and "no training or validation loss" in err


def test_a_resumed_run_replaces_the_steps_it_logs_again(tmp_path: Path) -> None:
    """The first job logged to step 8 but saved at 5; the resumed job logs 6-7 again and stops."""
    tb = tmp_path / "tb_logs"
    _write_events(
        tb,
        {"lm loss": [(s, 10.0 - s) for s in range(1, 9)], "learning-rate": [(1, 1e-3)]},
        "events.out.tfevents.1",
    )
    _write_events(tb, {"lm loss": [(6, 0.5), (7, 0.25)]}, "events.out.tfevents.2")
    curves = read_curves(tmp_path)
    (loss,) = curves.training
    assert list(loss.steps) == [1, 2, 3, 4, 5, 6, 7]
    assert list(loss.values)[-3:] == [5.0, 0.5, 0.25]


def test_tag_names_are_escaped_and_long_series_thinned(tmp_path: Path) -> None:
    n = curves_mod.MAX_DRAWN_POINTS * 3
    spike = n // 2
    points = [(s, 9.0 if s == spike else 1.0 + (s % 7) / 100) for s in range(1, n + 1)]
    _write_events(tmp_path / "tb_logs", {'lm loss"><script>x</script>': points}, "events.out.tfevents.1")
    page = write_plot(tmp_path).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    _svgs(page)  # still well-formed XML
    ((_, drawn),) = [v for v in _polylines(page).values() if v[0] == "training"]
    assert len(drawn) <= curves_mod.MAX_DRAWN_POINTS
    top = min(y for _, y in drawn)  # the spike (highest value: smallest y) survives the thinning
    assert sum(1 for _, y in drawn if y == top) == 1
    assert f"{n} values, drawn as {len(drawn)}" in page


def test_curves_of_very_large_event_files_are_left_to_viaduct_plot(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_pretrain_config(f"logger.tensorboard_dir={tmp_path / 'run' / 'tb_logs'}")
    _write_events(tmp_path / "run" / "tb_logs", {"lm loss": [(1, 2.0), (2, 1.0)]}, "events.out.tfevents.1")
    plot, note, curves = draw_curves(cfg)
    assert plot == str(tmp_path / "run" / PLOT_FILE) and note is None and len(curves.training[0]) == 2
    monkeypatch.setattr(run_report, "MAX_EVENTS_BYTES_AT_END", 10)
    plot, note, curves = draw_curves(cfg)
    assert plot is None and curves is None and f"viaduct plot {tmp_path / 'run'}" in note
