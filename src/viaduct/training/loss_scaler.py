"""Loss scaling for fp16 training: a constant scale, or Megatron's dynamic scaler with hysteresis.

The scale lives in a device tensor so that multiplying the loss needs no host round trip; the
scaler is told after each step whether the gradients overflowed (a host decision the fp16 path
makes anyway, to skip the update).
"""

from __future__ import annotations

import torch


class ConstantLossScaler:
    """A fixed loss scale (`optimizer.loss_scale`)."""

    def __init__(self, scale: float, device: torch.device) -> None:
        self.scale = torch.tensor(float(scale), dtype=torch.float32, device=device)

    @property
    def inv_scale(self) -> torch.Tensor:
        return self.scale.double().reciprocal().float()

    def update(self, found_inf: bool) -> None:
        """A constant scale never changes."""

    def state_dict(self) -> dict[str, float]:
        return {"scale": float(self.scale)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale.fill_(float(state["scale"]))


class DynamicLossScaler(ConstantLossScaler):
    """Megatron's `DynamicGradScaler`: halve after `hysteresis` overflows, double after a clean window.

    Each overflowing step costs one unit of hysteresis; when it runs out the scale is multiplied by
    `backoff_factor` (never below `min_scale`). After `growth_interval` consecutive clean steps the
    scale grows by `growth_factor` and the hysteresis is refilled.
    """

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_interval: int,
        hysteresis: int,
        device: torch.device,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
    ) -> None:
        super().__init__(initial_scale, device)
        self.min_scale = float(min_scale)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self.scale.mul_(self.backoff_factor).clamp_(min=self.min_scale)
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._growth_tracker = 0
            self._hysteresis_tracker = self.hysteresis
            self.scale.mul_(self.growth_factor)

    def state_dict(self) -> dict[str, float]:
        return {
            "scale": float(self.scale),
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        super().load_state_dict(state)
        self._growth_tracker = int(state["growth_tracker"])
        self._hysteresis_tracker = int(state["hysteresis_tracker"])
