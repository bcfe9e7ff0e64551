"""The device mesh of a run: `ParallelLayout` made real as a `torch.distributed.DeviceMesh`.

Every rank, group and size the run needs comes from here: data loading reads `dp_rank`/`dp_size`,
FSDP shards over `fsdp_mesh`, tensor parallelism splits over `tp_mesh`, context parallelism over
`cp_group`, pipeline stages talk over `pp_group`, and the token counts of the loss are summed over
`loss_group` (every rank of one pipeline stage that sees different tokens: data-parallel and
context-parallel ranks, not tensor-parallel ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from viaduct.distributed.layout import MESH_DIMS, ParallelLayout


@dataclass
class ParallelMesh:
    """The layout and, with more than one process, its device mesh and groups."""

    layout: ParallelLayout
    mesh: DeviceMesh | None = None
    """The full mesh (dp_replicate, dp_shard, cp, tp); None in a single process or under plain DDP."""
    flat: dict[str, DeviceMesh] = field(default_factory=dict)
    """Flattened views: "dp_shard_cp" (what FSDP shards over), "dp_cp" (the loss's token count on one
    stage) and, with pipeline stages, "pp_dp_cp" (the token count of a step, all stages together)."""
    tied_group: dist.ProcessGroup | None = None
    """With pipeline stages: this rank and its peer on the other end of the pipeline (first and last
    stage, same coordinates otherwise), which sum the gradients of the tied embedding table; None on
    the middle stages."""

    def _coordinate(self, name: str) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank(name)

    @property
    def dp_size(self) -> int:
        """Ranks that read different samples (batch arithmetic divides by this)."""
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which samples it reads)."""
        if self.mesh is None:
            return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return self._coordinate("dp_replicate") * self.layout.dp_shard + self._coordinate("dp_shard")

    @property
    def cp_rank(self) -> int:
        return self._coordinate("cp")

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage position (0: the first stage)."""
        return self._coordinate("pp")

    @property
    def stage_ranks(self) -> list[int]:
        """The global ranks of this rank's pipeline stage (every rank without pipeline parallelism)."""
        if self.mesh is None:
            return list(range(self.layout.world_size))
        return [int(r) for r in self.mesh.mesh[self.pp_rank].flatten().tolist()]

    @property
    def pp_group(self) -> dist.ProcessGroup:
        if self.mesh is None:
            raise RuntimeError("no device mesh: pipeline parallelism needs one")
        return self.mesh.get_group("pp")

    @property
    def tp_mesh(self) -> DeviceMesh:
        if self.mesh is None:
            raise RuntimeError("no device mesh: tensor parallelism needs one")
        return self.mesh["tp"]

    @property
    def cp_group(self) -> dist.ProcessGroup:
        if self.mesh is None:
            raise RuntimeError("no device mesh: context parallelism needs one")
        return self.mesh.get_group("cp")

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """What FSDP2 shards over: (dp_replicate, dp_shard × cp) for hybrid sharding, else dp_shard × cp."""
        if self.mesh is None:
            raise RuntimeError("no device mesh: FSDP needs one")
        if self.layout.dp_replicate > 1:
            # Built once: a 2-D mesh whose second dimension is the flattened shard × cp group.
            if "hsdp" not in self.flat:
                self.flat["hsdp"] = DeviceMesh._concatenate(
                    [self.mesh["dp_replicate"], self.flat["dp_shard_cp"]]
                )
            return self.flat["hsdp"]
        return self.flat["dp_shard_cp"]

    @property
    def loss_group(self) -> dist.ProcessGroup | None:
        """The ranks whose token counts add up to the step's tokens (None: the whole world)."""
        if self.mesh is None or (self.layout.tp == 1 and self.layout.pp == 1):
            return None
        return self.flat["dp_cp"].get_group()

    @property
    def step_token_group(self) -> dist.ProcessGroup | None:
        """The ranks whose token counts add up to a step's tokens, every pipeline stage included (the
        stages that do not compute the loss add zero): per-token loss scales every stage's gradients."""
        if self.layout.pp == 1:
            return self.loss_group
        if self.layout.tp == 1:
            return None
        return self.flat["pp_dp_cp"].get_group()


def build_mesh(layout: ParallelLayout, device: torch.device) -> ParallelMesh:
    """The mesh of `layout` over the initialized default process group (none needed for one rank or
    plain DDP, which uses the default group)."""
    if layout.world_size == 1 or not layout.uses_fsdp:
        return ParallelMesh(layout)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_mesh() needs the default process group")
    mesh = init_device_mesh(device.type, layout.mesh_shape, mesh_dim_names=MESH_DIMS)
    # Flattened views (torchtitan's names): one group each, so no collective runs over two dims.
    flat = {
        "dp_shard_cp": mesh["dp_shard", "cp"]._flatten("dp_shard_cp"),
        "dp_cp": mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
    }
    tied_group = None
    if layout.pp > 1:
        flat["pp_dp_cp"] = mesh["pp", "dp_replicate", "dp_shard", "cp"]._flatten("pp_dp_cp")
        tied_group = _tied_group(mesh, layout.pp)
    return ParallelMesh(layout, mesh, flat, tied_group)


def _tied_group(mesh: DeviceMesh, pp: int) -> dist.ProcessGroup | None:
    """This rank's (first stage, last stage) pair. Every rank creates every pair, in the same order, as
    `new_group` requires; with two stages that is simply the pipeline group."""
    if pp == 2:
        return mesh.get_group("pp")
    ranks = mesh.mesh.reshape(pp, -1)
    mine = None
    for column in range(ranks.shape[1]):
        pair = [int(ranks[0, column]), int(ranks[-1, column])]
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine  # None on a middle stage, which holds no tied table (it still created the groups)
