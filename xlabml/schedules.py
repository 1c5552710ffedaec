"""Learning-rate schedules, stepped once per optimizer step (``XLabModel`` registers them with
``interval='step'``).

YAML (under ``model:``)::

    scheduler:
      class_path: xlabml.schedules.WarmupCosine
      init_args: {warmup_steps: 100, total_steps: null, min_lr_ratio: 0.1}
"""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``, constant after that.

    ``total_steps=None`` means "the whole run": ``XLabModel.configure_optimizers`` fills it in from
    ``trainer.estimated_stepping_batches`` (until then, the rate stays at its peak after warmup).
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, last_epoch: int = -1):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps is not None and total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self):
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]
