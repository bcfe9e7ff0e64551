"""Loading into part of a model: a pipeline stage, DTensor-sharded parameters, padded vocabularies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conversion_helpers import VOCAB, save_hf, tokens

from viaduct import AutoBridge


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_pipeline_stage_reads_only_its_own_tensors(tmp_path: Path) -> None:
    save_hf("llama", tmp_path / "hf")
    whole_bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    whole = whole_bridge.to_megatron_provider().provide()
    # One tensor per shard, then layer 0's shards and the embedding's destroyed: the last stage
    # (layer 1, final norm, output layer) must not even open them.
    whole_bridge.save_hf_pretrained(whole, tmp_path / "sharded", max_shard_size=1)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        if name.startswith("model.layers.0.") or name == "model.embed_tokens.weight":
            (tmp_path / "sharded" / file).write_bytes(b"not a safetensors file")
    provider = AutoBridge.from_hf_pretrained(tmp_path / "sharded").to_megatron_provider()
    provider.pipeline_model_parallel_size = 2
    stage = provider.provide(pp_rank=1)
    assert stage.decoder.layers.global_indices == (1,)
    ref = dict(whole.named_parameters())
    names = [name for name, _ in stage.named_parameters()]
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in names and "output_layer.weight" in names
    for name, p in stage.named_parameters():
        assert torch.equal(p, ref[name]), name
    # The first stage does need the destroyed files, and says which one is broken.
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        provider.provide(pp_rank=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_tied_last_stage_gets_the_embedding_copy_and_export_skips_it(tmp_path: Path) -> None:
    save_hf("qwen2", tmp_path / "hf")  # tied
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    whole = bridge.to_megatron_provider().provide()
    provider = bridge.to_megatron_provider()
    provider.pipeline_model_parallel_size = 2
    last = provider.provide(pp_rank=1)
    copy = last.tied_output_weight()
    assert copy is not None and torch.equal(copy, whole.embedding.word_embeddings.weight)
    names = [name for name, _ in bridge.export_hf_weights(last)]
    assert "model.embed_tokens.weight" not in names and "model.norm.weight" in names


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_padded_vocabulary_rows_keep_their_init_and_are_stripped_on_export(tmp_path: Path) -> None:
    save_hf("llama", tmp_path / "hf", vocab_size=VOCAB + 1)  # odd: tensor parallelism of 2 pads a row
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    plain = bridge.to_megatron_provider(load_weights=False)
    plain.tensor_model_parallel_size = 2
    init = plain.provide(init_seed=5)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    model = provider.provide(init_seed=5)
    emb = model.embedding.word_embeddings.weight
    assert emb.shape[0] == VOCAB + 2
    assert torch.equal(emb[-1], init.embedding.word_embeddings.weight[-1])
    assert not torch.equal(emb[0], init.embedding.word_embeddings.weight[0])
    exported = dict(bridge.export_hf_weights(model))
    assert exported["model.embed_tokens.weight"].shape[0] == VOCAB + 1
    assert exported["lm_head.weight"].shape[0] == VOCAB + 1


@pytest.mark.filterwarnings("ignore:DTensor random operators")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fsdp_sharded_parameters_load_their_local_shard(tmp_path: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    save_hf("qwen3", tmp_path / "hf")
    bridge = AutoBridge.from_hf_pretrained(tmp_path / "hf")
    ref = bridge.to_megatron_provider().provide().eval()
    model = bridge.to_megatron_provider(load_weights=False).provide(init_seed=2).eval()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for layer in model.decoder.layers:
            fully_shard(layer)
        fully_shard(model)
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        bridge.load_hf_weights(model)
        for name, p in ref.named_parameters():
            assert torch.equal(params[name].full_tensor(), p), name
        with torch.no_grad():
            torch.testing.assert_close(model(tokens()), ref(tokens()), atol=1e-6, rtol=0)
        exported = dict(bridge.export_hf_weights(model))
        assert all(torch.equal(exported[n], t) for n, t in bridge.export_hf_weights(ref))
    finally:
        dist.destroy_process_group()


def _two_rank_fsdp_load(rank: int, world: int, hf_dir: str, out_dir: str) -> dict[str, list[int]]:
    import warnings

    from torch.distributed.fsdp import fully_shard

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    try:
        bridge = AutoBridge.from_hf_pretrained(hf_dir)
        ref = bridge.to_megatron_provider()
        ref.tensor_model_parallel_size = 2  # pads the 97-row vocabulary to 98
        whole = ref.provide(init_seed=7)
        plain = bridge.to_megatron_provider(load_weights=False)
        plain.tensor_model_parallel_size = 2
        model = plain.provide(init_seed=7)
        for layer in model.decoder.layers:
            fully_shard(layer)
        fully_shard(model)
        bridge.load_hf_weights(model)
        local_rows = {}
        for name, p in model.named_parameters():
            # Each rank holds an uneven share (97 + 1 padding rows over 2 ranks), loaded in place.
            assert torch.equal(p.full_tensor(), dict(whole.named_parameters())[name]), name
            local_rows[name] = list(p.to_local().shape)
        # Gathering is collective: every rank walks the parameters, rank 0 writes.
        if rank == 0:
            bridge.save_hf_pretrained(model, out_dir)
        else:
            list(bridge.export_hf_weights(model))
        return local_rows
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_fsdp_ranks_each_load_their_own_uneven_shard(tmp_path: Path) -> None:
    from safetensors import safe_open

    from viaduct.testing import run_distributed

    save_hf("llama", tmp_path / "hf", vocab_size=VOCAB + 1)
    rows = run_distributed(_two_rank_fsdp_load, 2, str(tmp_path / "hf"), str(tmp_path / "out"), timeout=120)
    assert rows["embedding.word_embeddings.weight"] == [49, 32]  # rank 0's half of 98 rows
    with (
        safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
