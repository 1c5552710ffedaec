"""Learning-rate schedules, stepped once per optimizer step (``XLabModel`` registers them with
``interval='step'``).

YAML (under ``model:``)::

    scheduler:
      class_path: xlabml.schedules.WarmupCosine
      init_args: {warmup_steps: 100, total_steps: null, min_lr_ratio: 0.1}
"""

import math
import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``, constant after that.

    ``total_steps=None`` means "the whole run": ``XLabModel.configure_optimizers`` fills it in from
    ``trainer.estimated_stepping_batches`` (until then, the rate stays at its peak after warmup).

    Resuming (``load_state_dict``) takes the step count from the checkpoint and the schedule's shape (warmup,
    total, floor) from this run's configuration: a run resumed with a larger ``max_steps`` decays over the new
    whole run instead of staying at the old horizon's floor (a warning names both totals).
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

    def load_state_dict(self, state_dict):
        shape = self.warmup_steps, self.total_steps, self.min_lr_ratio
        super().load_state_dict(state_dict)
        if shape[1] is None:  # not filled in by a trainer: nothing to follow but the checkpoint
            return
        saved = self.total_steps
        self.warmup_steps, self.total_steps, self.min_lr_ratio = shape
        if saved != self.total_steps:
            warnings.warn(f"WarmupCosine: resumed at step {self.last_epoch} of a schedule over {saved} steps; it "
                          f"now follows this run's {self.total_steps} steps", UserWarning, stacklevel=2)
        # the optimizer's rates were restored from the checkpoint; this run's schedule sets them from this step on
        self._last_lr = [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group['lr'] = lr

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
