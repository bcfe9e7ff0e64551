"""A job of two "nodes" on one machine: two torchrun agents meeting at one c10d rendezvous, as
`torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m viaduct pretrain ...` does on a
cluster. The ranks of both agents form one sharded data-parallel job and save one checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from viaduct.testing import tiny_pretrain_config, torchrun_nodes

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_nodes_train_one_sharded_job(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    tiny_pretrain_config().to_yaml(config)
    save = tmp_path / "ckpt"
    agents = torchrun_nodes(
        2,
        1,
        "pretrain",
        "--config-file",
        str(config),
        "train.train_iters=2",
        "train.eval_iters=0",
        "ddp.use_distributed_optimizer=true",
        f"checkpoint.save={save}",
        cwd=tmp_path,
    )
    for agent in agents:
        assert agent.returncode == 0, agent.stdout[-3000:]
    out = "".join(a.stdout for a in agents)
    assert "world size 2: dp 2 (sharded, optim) × cp 1 × tp 1" in out
    assert "iteration        2/       2" in out
    meta = json.loads((save / "iter_0000002" / "metadata.json").read_text())
    assert meta["world_size"] == 2
