"""`rng`: seeds of the random-number generators."""

from dataclasses import dataclass
from typing import ClassVar

from viaduct.config import ConfigBase, Problems


@dataclass(kw_only=True)
class RNGConfig(ConfigBase):
    """Seeds of Python, NumPy and torch; each rank uses seed + 100 × its pipeline rank."""

    _component_: ClassVar[str] = "rng"

    seed: int = 1234
    """Base random seed; each rank derives its own from it."""

    data_parallel_random_init: bool = False
    """Initialize parameters differently per data-parallel rank (adds 10 × data-parallel rank to the seed)."""

    _legacy_fields_: ClassVar[dict[str, str]] = {
        "te_rng_tracker": "Transformer Engine is not used",
        "inference_rng_tracker": "Megatron Core inference RNG tracker; not used",
    }

    def finalize(self) -> None:
        """The seed must be positive and leave room for the per-rank offsets."""
        p = Problems()
        if not 0 < self.seed < 2**31:
            p.add("seed", "must be in [1, 2**31)", self.seed, fix="set rng.seed to a positive 31-bit number")
        p.raise_if_any()
