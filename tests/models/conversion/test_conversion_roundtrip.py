"""HF -> viaduct -> HF for every architecture, with transformers as the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conversion_helpers import ARCHS, load_hf, save_hf, tokens
from safetensors import safe_open

from viaduct import AutoBridge


def _positions(arch: str) -> torch.Tensor:
    # Far positions make Llama 3.1's frequency scaling matter (it changes only the slow frequencies).
    return torch.arange(12)[None].expand(2, 12) + (2000 if arch == "llama31" else 0)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_matches_transformers_and_export_round_trips(arch: str, tmp_path: Path) -> None:
    src, out = tmp_path / "hf", tmp_path / "out"
    hf = save_hf(arch, src)
    bridge = AutoBridge.from_hf_pretrained(src)
    model = bridge.to_megatron_provider().provide().eval()
    x, pos = tokens(), _positions(arch)
    with torch.no_grad():
        ref = hf(x, position_ids=pos).logits
        torch.testing.assert_close(model(x, position_ids=pos), ref, atol=1e-5, rtol=0)

    bridge.save_hf_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    # Every tensor comes back bit for bit, with the names and dtypes transformers saved.
    before, after = _tensors(src), _tensors(out)
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((src / "config.json").read_text())["architectures"]
    assert config["torch_dtype"] == "float32"
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(x, position_ids=pos).logits, ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trained_weights_export_to_an_equivalent_transformers_model(tmp_path: Path) -> None:
    # Changed weights (not just the ones read in) come out where transformers expects them.
    save_hf("llama", tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    model = bridge.to_megatron_provider(load_weights=False).provide(init_seed=3).eval()
    # Wrapped as torch.compile wraps it (parameter names prefixed "_orig_mod."): same names to HF.
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model
    bridge.save_hf_pretrained(wrapped, tmp_path / "out")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "out")(x).logits, model(x), atol=1e-5, rtol=0)
    # And loads back through the wrapper.
    fresh = torch.nn.Module()
    fresh._orig_mod = bridge.to_megatron_provider(load_weights=False).provide(init_seed=4)
    bridge.load_hf_weights(fresh, tmp_path / "out")
    assert all(
        torch.equal(p, dict(model.named_parameters())[k]) for k, p in fresh._orig_mod.named_parameters()
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sharded_save_writes_hf_named_shards_and_an_index(tmp_path: Path) -> None:
    save_hf("qwen2", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    model = bridge.to_megatron_provider().provide()
    out = tmp_path / "out"
    bridge.save_hf_pretrained(model, out, max_shard_size=8 * 1024)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(out).values())
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind
    # The sharded directory reads back (viaduct and transformers) to the same model.
    again = AutoBridge.from_hf_pretrained(out).to_megatron_provider().provide()
    assert all(torch.equal(p, dict(again.named_parameters())[k]) for k, p in model.named_parameters())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(x).logits, model.eval()(x), atol=1e-5, rtol=0)
    # Saving again over it replaces it whole (a smaller single file: the old shards are gone).
    bridge.save_hf_pretrained(model, out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_failed_save_leaves_no_directory(tmp_path: Path) -> None:
    save_hf("llama", tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    stage = bridge.to_megatron_provider(load_weights=False)
    stage.pipeline_model_parallel_size = 2
    with pytest.raises(ValueError, match=r"(?s)not whole .*model\.layers\.0\."):
        bridge.save_hf_pretrained(stage.provide(pp_rank=1), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
