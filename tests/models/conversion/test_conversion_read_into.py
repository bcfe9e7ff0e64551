"""Loading Hugging Face tensors in place: `SafetensorsReader.read_into` and `ParamMapping.megatron_views`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from viaduct.config import ConfigError
from viaduct.models.conversion.mapping import ParamMapping, QKVLayout
from viaduct.models.conversion.safetensors_io import SafetensorsReader


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_read_into_every_kind_of_target(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g).to(torch.bfloat16)
    b = torch.randn(5, generator=g)
    save_file({"a": a, "b": b}, str(tmp_path / "model.safetensors"))
    with SafetensorsReader(tmp_path) as reader:
        same = torch.empty(6, 4, dtype=torch.bfloat16)  # read straight into it
        reader.read_into("a", same)
        assert torch.equal(same, a)
        wider = torch.empty(6, 4)  # another dtype: through the buffer, cast on copy
        reader.read_into("a", wider)
        assert torch.equal(wider, a.float())
        big = torch.zeros(3, 4, 4, dtype=torch.bfloat16)  # a strided view in another shape
        reader.read_into("a", big[:, :2])
        assert torch.equal(big[:, :2].reshape(6, 4), a) and not big[:, 2:].any()
        out = torch.empty(5, dtype=torch.float64)
        reader.read_into("b", out)
        assert torch.equal(out, b.double())


def test_read_into_a_truncated_file_is_a_config_error(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1000)}, str(tmp_path / "model.safetensors"))
    with SafetensorsReader(tmp_path) as reader:
        reader.info("a")  # the header is checked while the file is whole
        with open(tmp_path / "model.safetensors", "r+b") as f:
            f.truncate(f.seek(0, 2) - 100)
        with pytest.raises(ConfigError, match="ends inside tensor 'a'"):
            reader.read_into("a", torch.empty(1000))


def test_read_into_leaves_no_file_pages_resident(tmp_path: Path) -> None:
    # Reading through the memory map leaves the tensor's pages mapped (resident) until the file is
    # closed, which puts a checkpoint's size on top of the model's while a model loads.
    n = 16 * 2**20  # 64 MiB of float32
    save_file({"w": torch.ones(n), "small": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    out = torch.zeros(n)
    with SafetensorsReader(tmp_path) as reader:
        reader.read_into("small", torch.empty(4))
        before = _rss_file_kib()
        reader.read_into("w", out)
        grown = _rss_file_kib() - before
    assert bool(out.eq(1).all())
    assert grown < 16 * 1024, f"file-backed resident memory grew by {grown} KiB"


def test_megatron_views_place_rows_as_to_megatron_merges() -> None:
    g = torch.Generator().manual_seed(0)
    h = 5
    qkv = ParamMapping(
        "qkv",
        ("q", "k", "v"),
        ((2 * 3 * 4, h), (2 * 4, h), (2 * 4, h)),
        kind="qkv",
        qkv=QKVLayout(groups=2, heads_per_group=3, head_dim=4),
    )
    gated = ParamMapping("fc1", ("gate", "up"), ((7, h), (7, h)), kind="gated")
    emb = ParamMapping("emb", ("e",), ((10, h),), vocab_rows=True)
    bias = ParamMapping("b", ("qb", "kb", "vb"), ((4,), (2,), (2,)), kind="qkv", qkv=QKVLayout(2, 2, 1))
    for pm, rows in ((qkv, 40), (gated, 14), (emb, 12), (bias, 8)):
        hf = [torch.randn(s, generator=g) for s in pm.hf_shapes]
        param = torch.zeros(rows, *pm.hf_shapes[0][1:])
        views = pm.megatron_views(param)
        assert views is not None
        for view, t in zip(views, hf, strict=True):
            view.copy_(t.reshape(view.shape))
        merged = pm.to_megatron(hf)
        assert torch.equal(param[: merged.shape[0]], merged)
        assert not param[merged.shape[0] :].any()  # vocabulary padding rows untouched
    transposed = ParamMapping("t", ("t",), ((3, 4),), kind="transpose")
    assert transposed.megatron_views(torch.zeros(4, 3)) is None
    assert qkv.megatron_views(torch.zeros(h, 40).t()) is None  # not contiguous
