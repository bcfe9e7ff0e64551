"""Loss curves of a run as a self-contained HTML page (one inline SVG per chart, no script, no
dependency beyond tensorboard), read back from the run's TensorBoard event files.

    from viaduct.training.curves import write_plot
    write_plot("runs/tiny_gpt")              # -> runs/tiny_gpt/loss_curves.html

`viaduct plot RUN_DIR` does the same from the command line, and `viaduct pretrain` writes the page at
the end of a run that logs to TensorBoard.

Event files are untrusted input. They are read record by record with tensorboard's own record
reader (every record's checksums verified) and event protobuf; a damaged record, a record that is not
an event, or a directory without event files is a `CurvesError` naming the file, never a traceback.
Only the scalars that are drawn are kept, in flat arrays: memory stays well below the files' size.
"""

from __future__ import annotations

import html
import math
import os
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from viaduct.config.errors import ConfigError, Problem

if TYPE_CHECKING:
    from tensorboard.compat.proto.summary_pb2 import Summary

PLOT_FILE = "loss_curves.html"
"""The page's name: in the run directory (recipes' layout), else in the event directory."""
TB_SUBDIR = "tb_logs"
"""Where the recipes' run directories keep their TensorBoard logs (`recipes.common.set_run_dir`)."""
LEARNING_RATE_TAG = "learning-rate"
MAX_SERIES = 8
"""Loss series drawn per chart; more (an unusual forward step logging dozens of losses) are listed
as left out instead of making the chart unreadable."""
MAX_DRAWN_POINTS = 4000
"""Above this many points a series is thinned for drawing (each bucket keeps its lowest and highest
value, so spikes stay visible): a 300,000-step run still makes a page of a few hundred KB."""


class CurvesError(ConfigError):
    """The event files cannot be read or hold nothing to plot (a `ConfigError`: the CLI exits 2)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem, header="cannot plot the loss curves")


@dataclass
class Series:
    """One scalar tag: its iterations (increasing) and values."""

    tag: str
    steps: array = field(default_factory=lambda: array("q"))
    values: array = field(default_factory=lambda: array("d"))

    def add(self, step: int, value: float) -> None:
        # A resumed run logs again from its checkpoint's step on: the newer value of a step, and
        # everything the earlier job logged after it, replace the old ones (TensorBoard draws both
        # jobs' values over each other for SummaryWriter's files: it purges only on a restart marker).
        if self.steps and step <= self.steps[-1]:
            cut = bisect_left(self.steps, step)
            del self.steps[cut:]
            del self.values[cut:]
        self.steps.append(step)
        self.values.append(value)

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class Curves:
    """What a run's event files hold to plot."""

    events_dir: Path
    files: list[Path]
    training: list[Series]
    """Training losses ("lm loss", ...), by iteration."""
    validation: list[Series]
    """"<loss> validation" series."""
    learning_rate: Series | None
    notes: list[str] = field(default_factory=list)
    """Things the reader should know (an incomplete last record, series left out)."""


def _kind(tag: str) -> str | None:
    """Which chart a scalar tag belongs to: "train", "validation", "lr" or None (not drawn)."""
    if tag == LEARNING_RATE_TAG:
        return "lr"
    low = tag.lower()
    if "loss" not in low or "loss-scale" in low or "loss scale" in low:
        return None
    if low.endswith((" vs samples", " ppl", " test")):  # another x axis, derived, one point at the end
        return None
    if low.endswith(" validation"):
        return "validation"
    return "train"


def find_events_dir(path: str | os.PathLike[str]) -> Path:
    """The directory holding the event files: `<path>/tb_logs` of a run directory, else `path`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CurvesError(
            Problem(
                "RUN_DIR",
                "no such file or directory",
                str(path),
                fix="pass a run directory (holding tb_logs/) or a run's logger.tensorboard_dir",
            )
        )
    if p.is_file():
        return p.parent if _is_events_file(p) else _no_events(p)
    sub = p / TB_SUBDIR
    if sub.is_dir() and not _event_files(p):
        return sub
    return p


def _is_events_file(p: Path) -> bool:
    return "tfevents" in p.name  # TensorBoard's own rule (io_wrapper.IsTensorFlowEventsFile)


def _event_files(directory: Path) -> list[Path]:
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise CurvesError(
            Problem("RUN_DIR", f"cannot list the directory: {exc.strerror or exc}", str(directory))
        ) from exc
    # Sorted by name as TensorBoard does: SummaryWriter names start with the creation time, so a
    # resumed run's file comes after the first job's.
    return sorted(e for e in entries if _is_events_file(e) and e.is_file())


def _no_events(p: Path) -> NoReturn:
    raise CurvesError(
        Problem(
            "RUN_DIR",
            "holds no TensorBoard event files (events.out.tfevents.*)",
            str(p),
            fix="pass a run directory (holding tb_logs/) or the logger.tensorboard_dir of a run that "
            "logged to TensorBoard (runs without logger.tensorboard_dir record no curves)",
        )
    )


def _damaged(path: Path, record: int, why: str) -> CurvesError:
    return CurvesError(
        Problem(
            str(path),
            f"is damaged: record {record} {why}",
            fix="the file was altered or is not a TensorBoard event file; move it out of the "
            "directory to plot the others",
        )
    )


def _records(path: Path) -> Iterator[tuple[int, bytes]]:
    """(record number, bytes) of each checksum-verified record; an incomplete last record (the
    writer stopped mid-write) ends the file quietly, any other damage raises `CurvesError`."""
    from tensorboard.compat.tensorflow_stub import errors as tf_errors
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    try:
        reader = PyRecordReader_New(str(path))
    except (OSError, tf_errors.OpError) as exc:
        raise CurvesError(Problem(str(path), f"cannot be opened: {exc}")) from exc
    try:
        n = 0
        while True:
            n += 1
            try:
                reader.GetNext()
            except tf_errors.OutOfRangeError:
                return
            except tf_errors.DataLossError as exc:
                if "truncated" in str(exc):
                    raise _Truncated(n) from exc
                raise _damaged(path, n, "fails its checksum") from exc
            except (MemoryError, OverflowError) as exc:  # a length field no file can hold
                raise _damaged(path, n, "claims an impossible length") from exc
            except OSError as exc:
                raise CurvesError(Problem(str(path), f"cannot be read: {exc}")) from exc
            except Exception as exc:  # anything else the reader trips on is a file it cannot read
                raise _damaged(path, n, f"cannot be read ({type(exc).__name__}: {exc})") from exc
            yield n, reader.record()
    finally:
        reader.file_handle.close()


class _Truncated(Exception):
    def __init__(self, record: int) -> None:
        self.record = record


def _scalar_value(value: Summary.Value) -> float | None:
    """The float of one summary value when it is a scalar, else None."""
    if value.HasField("simple_value"):
        return float(value.simple_value)
    if not value.HasField("tensor") or value.metadata.plugin_data.plugin_name != "scalars":
        return None
    tensor = value.tensor
    # A scalar has no dimension above 1: checked first, so that a crafted shape cannot make numpy
    # allocate what it claims.
    if any(d.size != 1 for d in tensor.tensor_shape.dim):
        return None
    from tensorboard.util import tensor_util

    try:
        return float(tensor_util.make_ndarray(tensor).reshape(()))
    except Exception:  # an unknown dtype or inconsistent content: not a scalar this reader can use
        return None


def read_curves(path: str | os.PathLike[str]) -> Curves:
    """Read the training loss, validation loss and learning rate of a run (a run directory with
    tb_logs/, or an event directory). Raises `CurvesError` when there is nothing readable to plot."""
    from tensorboard.compat.proto import event_pb2

    events_dir = find_events_dir(path)
    files = _event_files(events_dir)
    if not files:
        _no_events(events_dir)
    series: dict[str, Series] = {}
    notes: list[str] = []
    for file in files:
        try:
            for n, record in _records(file):
                try:
                    event = event_pb2.Event.FromString(record)
                except Exception as exc:  # protobuf's DecodeError, or what its C parser raises
                    raise _damaged(file, n, "is not a TensorBoard event") from exc
                if not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    if _kind(value.tag) is None:
                        continue
                    number = _scalar_value(value)
                    if number is not None:
                        series.setdefault(value.tag, Series(value.tag)).add(int(event.step), number)
        except _Truncated as cut:
            notes.append(
                f"{file.name}: its last record ({cut.record}) is incomplete (the writer stopped "
                "mid-write) and is left out"
            )
    training = [s for t, s in series.items() if _kind(t) == "train"]
    validation = [s for t, s in series.items() if _kind(t) == "validation"]
    if not training and not validation:
        raise CurvesError(
            Problem(
                str(events_dir),
                "the event files hold no training or validation loss to plot",
                fix="check that this is the logger.tensorboard_dir of a training run that ran at least "
                "one logged step",
            )
        )
    for name, group in (("training", training), ("validation", validation)):
        if len(group) > MAX_SERIES:
            left = sorted(s.tag for s in group[MAX_SERIES:])
            notes.append(f"{len(left)} more {name} losses are not drawn: {', '.join(left[:20])}")
            del group[MAX_SERIES:]
    return Curves(events_dir, files, training, validation, series.get(LEARNING_RATE_TAG), notes)


# ------------------------------------------------------------------------------------------ drawing

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_WIDTH = 880
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 78, 24, 16, 44
_LEGEND_WIDTH = 240
_LARGEST_DRAWN = 1e100  # NaN fails the comparison too


def _finite_points(s: Series) -> tuple[list[tuple[int, float]], int]:
    """The drawable (step, value) pairs of `s`, thinned to MAX_DRAWN_POINTS; and how many were not
    drawable (NaN, infinite, or so large that the axis span itself would overflow)."""
    pts = [(st, v) for st, v in zip(s.steps, s.values) if abs(v) <= _LARGEST_DRAWN]
    dropped = len(s) - len(pts)
    if len(pts) <= MAX_DRAWN_POINTS:
        return pts, dropped
    buckets = MAX_DRAWN_POINTS // 2
    thinned: list[tuple[int, float]] = []
    for b in range(buckets):
        chunk = pts[b * len(pts) // buckets : (b + 1) * len(pts) // buckets]
        if not chunk:
            continue
        lo = min(chunk, key=lambda p: p[1])
        hi = max(chunk, key=lambda p: p[1])
        thinned.extend(sorted({lo, hi}))
    return thinned, dropped


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    for i in range(3 * count):  # bounded: with huge values `first + i * step` may not move
        t = first + i * step
        if t > hi + step * 1e-9:
            break
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) < 1e-2 or abs(v) >= 1e5:
        return f"{v:.1e}"
    return f"{v:.4g}"


@dataclass
class _Line:
    label: str
    points: list[tuple[int, float]]
    color: str
    markers: bool
    cls: str
    total: int


def _chart(title: str, lines: list[_Line], x_range: tuple[int, int], height: int) -> str:
    """One SVG chart: axes, grid, ticks, the lines (and markers), and a legend."""
    values = [v for line in lines for _, v in line.points]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    x0, x1 = x_range
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    plot_w = _WIDTH - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_h = height - _MARGIN_TOP - _MARGIN_BOTTOM

    def sx(step: float) -> float:
        return _MARGIN_LEFT + (step - x0) / (x1 - x0) * plot_w

    def sy(value: float) -> float:
        return _MARGIN_TOP + (hi - value) / (hi - lo) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<rect x="{_MARGIN_LEFT}" y="{_MARGIN_TOP}" width="{plot_w}" height="{plot_h}" '
        'fill="#fff" stroke="#999"/>',
    ]
    for t in _nice_ticks(lo, hi):
        y = sy(t)
        right = _MARGIN_LEFT + plot_w
        out.append(
            f'<line x1="{_MARGIN_LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{_MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>'
        )
    for t in _nice_ticks(x0, x1):
        if t != int(t):
            continue
        x = sx(t)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_MARGIN_TOP}" y2="{_MARGIN_TOP + plot_h}" stroke="#eee"/>'
            f'<text x="{x:.1f}" y="{_MARGIN_TOP + plot_h + 16}" text-anchor="middle">{int(t)}</text>'
        )
    out.append(
        f'<text x="{_MARGIN_LEFT + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle">iteration</text>'
        f'<text transform="translate(16 {_MARGIN_TOP + plot_h / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(title)}</text>'
    )
    lx = _MARGIN_LEFT + plot_w - _LEGEND_WIDTH - 8
    if lines:  # the legend sits on a white box in the top right corner, over the grid
        out.append(
            f'<rect x="{lx - 6}" y="{_MARGIN_TOP + 4}" width="{_LEGEND_WIDTH}" '
            f'height="{16 * len(lines) + 6}" fill="#fff" fill-opacity="0.85" stroke="#ccc"/>'
        )
    for i, line in enumerate(lines):
        coords = " ".join(f"{sx(s):.1f},{sy(v):.2f}" for s, v in line.points)
        label = html.escape(line.label)
        out.append(
            f'<polyline class="{line.cls}" data-series="{label}" data-points="{len(line.points)}" '
            f'fill="none" stroke="{line.color}" stroke-width="1.6" points="{coords}"/>'
        )
        if line.markers:
            for s, v in line.points:
                out.append(
                    f'<circle cx="{sx(s):.1f}" cy="{sy(v):.2f}" r="3" fill="{line.color}">'
                    f"<title>{label}: {_fmt(v)} at iteration {s}</title></circle>"
                )
        ly = _MARGIN_TOP + 20 + 16 * i
        shown = label + " (training)" if line.cls == "training" else label
        out.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{ly - 4}" y2="{ly - 4}" stroke="{line.color}" '
            f'stroke-width="2"/><text x="{lx + 28}" y="{ly}">{shown}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def render_html(curves: Curves, title: str) -> str:
    """The page: the loss chart (training and validation), the learning-rate chart when logged,
    a short table of final values, and any notes. Everything read from the files is escaped."""
    notes = list(curves.notes)
    loss_lines: list[_Line] = []
    k = 0
    for group, cls, markers in (
        (curves.training, "training", False),
        (curves.validation, "validation", True),
    ):
        for s in group:
            pts, dropped = _finite_points(s)
            if dropped:
                notes.append(f"{s.tag}: {dropped} non-finite (or beyond ±1e100) value(s) are not drawn")
            loss_lines.append(_Line(s.tag, pts, _COLORS[k % len(_COLORS)], markers, cls, len(s)))
            k += 1
    lr_lines: list[_Line] = []
    if curves.learning_rate is not None and len(curves.learning_rate):
        pts, _ = _finite_points(curves.learning_rate)
        lr_lines.append(
            _Line(LEARNING_RATE_TAG, pts, "#555", False, "learning-rate", len(curves.learning_rate))
        )
    steps = [p[0] for line in loss_lines + lr_lines for p in line.points]
    x_range = (min(steps), max(steps)) if steps else (0, 1)

    rows = []
    for line in loss_lines:
        if line.points:
            last_step, last = line.points[-1]
            best = min(v for _, v in line.points)
            rows.append(
                f"<tr><td>{html.escape(line.label)}</td><td>{line.total}</td>"
                f"<td>{_fmt(last)} (iteration {last_step})</td><td>{_fmt(best)}</td></tr>"
            )
        if line.total > MAX_DRAWN_POINTS and line.points:
            notes.append(
                f"{line.label}: {line.total} values, drawn as {len(line.points)} "
                "(the lowest and highest of each stretch)"
            )
    files = ", ".join(html.escape(f.name) for f in curves.files)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}"
        "svg text{font:12px system-ui,sans-serif;fill:#333}"
        "table{border-collapse:collapse}td,th{padding:2px 12px;text-align:left;border-bottom:1px solid #ddd}"
        ".note{color:#8a5a00}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Loss</h2>",
        _chart("loss", loss_lines, x_range, 380),
    ]
    if lr_lines:
        parts += ["<h2>Learning rate</h2>", _chart("learning rate", lr_lines, x_range, 220)]
    parts += [
        "<h2>Values</h2>",
        "<table><tr><th>series</th><th>points</th><th>last</th><th>lowest</th></tr>",
        *rows,
        "</table>",
        *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
        f"<p>Read from {html.escape(str(curves.events_dir))} ({files}). "
        f"Redraw with <code>viaduct plot {html.escape(_run_name(curves.events_dir))}</code>; "
        f"explore with <code>tensorboard --logdir {html.escape(str(curves.events_dir))}</code>.</p>",
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


def default_output(events_dir: Path) -> Path:
    """Where the page goes: the run directory for the recipes' layout (`<run>/tb_logs` beside it),
    else the event directory itself (TensorBoard ignores files that are not event files)."""
    return events_dir.parent / PLOT_FILE if events_dir.name == TB_SUBDIR else events_dir / PLOT_FILE


def write_plot(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Read the curves under `path` and write the page to `output` (default: `default_output`).

    The page is written aside and renamed, so a reader never sees half of it. Returns its path.
    """
    return save_page(read_curves(path), output)


def save_page(curves: Curves, output: str | os.PathLike[str] | None = None) -> Path:
    """Write the page of `curves` to `output` (default: `default_output`); returns its path."""
    out = Path(output).expanduser() if output is not None else default_output(curves.events_dir)
    if out.is_dir():  # a directory given as the output gets the page under its usual name
        out = out / PLOT_FILE
    title = f"Loss curves: {_run_name(curves.events_dir)}"
    text = render_html(curves, title)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CurvesError(
            Problem(
                str(out),
                f"cannot be written: {exc.strerror or exc}",
                fix="choose a writable file (viaduct plot RUN_DIR --output FILE)",
            )
        ) from exc
    return out


def _run_name(events_dir: Path) -> str:
    return str(events_dir.parent if events_dir.name == TB_SUBDIR else events_dir)
