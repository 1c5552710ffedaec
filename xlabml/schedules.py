"""Learning-rate schedules, stepped once per optimizer step (``XLabModel`` registers them with
``interval='step'``).

YAML (under ``model:``)::

    scheduler:
      class_path: xlabml.schedules.WarmupCosine
      init_args: {warmup_steps: 100, total_steps: null, min_lr_ratio: 0.1}

    scheduler:                         # warmup-stable-decay: constant, then decay over the last 20%
      class_path: xlabml.schedules.WSD
      init_args: {warmup_steps: 100, total_steps: null, decay_fraction: 0.2, decay: linear}

Every schedule here is a function ``factor(step)`` of the optimizer step multiplying each group's base rate, and
resumes the same way (``StepSchedule.load_state_dict``): the step count comes from the checkpoint, the shape
(warmup, total, ...) from this run's configuration.
"""

import math
import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class StepSchedule(LRScheduler):
    """Base of the schedules here: ``factor(step)`` times each group's base rate, with ``total_steps=None``
    filled in by ``XLabModel.configure_optimizers`` from ``trainer.estimated_stepping_batches`` (until then the
    rate stays at its peak after warmup).

    Resuming (``load_state_dict``) takes the step count from the checkpoint and the schedule's shape (the
    attributes named in ``shape_names``) from this run's configuration: a run resumed with a larger
    ``max_steps`` follows the new whole run instead of the old horizon (a warning names both totals).
    """
    shape_names = ('warmup_steps', 'total_steps')

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int | None, last_epoch: int = -1):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if total_steps is not None and total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        super().__init__(optimizer, last_epoch)

    def load_state_dict(self, state_dict):
        shape = {name: getattr(self, name) for name in self.shape_names}
        super().load_state_dict(state_dict)
        if shape['total_steps'] is None:  # not filled in by a trainer: nothing to follow but the checkpoint
            return
        saved = self.total_steps
        for name, value in shape.items():
            setattr(self, name, value)
        if saved != self.total_steps:
            warnings.warn(f"{type(self).__name__}: resumed at step {self.last_epoch} of a schedule over {saved} "
                          f"steps; it now follows this run's {self.total_steps} steps", UserWarning, stacklevel=2)
        # the optimizer's rates were restored from the checkpoint; this run's schedule sets them from this step on
        self._last_lr = [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group['lr'] = lr

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
        raise NotImplementedError

    def get_lr(self):
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


class WarmupCosine(StepSchedule):
    """Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``, constant after that. ``total_steps=None``: the whole run; resuming:
    see ``StepSchedule``.
    """
    shape_names = ('warmup_steps', 'total_steps', 'min_lr_ratio')

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 min_lr_ratio: float = 0.1, last_epoch: int = -1):
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, warmup_steps, total_steps, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


DECAYS = {  # progress p in [0, 1] -> remaining share of the rate above the floor
    'linear': lambda p: 1.0 - p,
    'cosine': lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    '1-sqrt': lambda p: 1.0 - math.sqrt(p),
}


class WSD(StepSchedule):
    """Warmup-stable-decay (MiniCPM; the modded-nanogpt speedrun's schedule): linear warmup from
    ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` steps, constant ``lr`` until the decay starts, then
    ``decay`` ('linear', 'cosine' or '1-sqrt') down to ``min_lr_ratio * lr`` over the last ``decay_fraction`` of
    ``total_steps`` (``decay_steps = round(decay_fraction * total_steps)``, starting at ``total_steps -
    decay_steps`` but never before warmup ends), reaching the floor at ``total_steps``; constant after that.

    Because the rate is flat until the decay, a run can be extended from any checkpoint of the stable phase
    (resumed with a larger ``max_steps`` it stays flat longer, see ``StepSchedule``).
    """
    shape_names = ('warmup_steps', 'total_steps', 'min_lr_ratio', 'decay_fraction', 'decay')

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 decay_fraction: float = 0.2, decay: str = 'linear', min_lr_ratio: float = 0.0,
                 last_epoch: int = -1):
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        if decay not in DECAYS:
            raise ValueError(f"decay={decay!r}: expected one of {', '.join(DECAYS)}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.decay_fraction, self.decay, self.min_lr_ratio = decay_fraction, decay, min_lr_ratio
        super().__init__(optimizer, warmup_steps, total_steps, last_epoch)

    def decay_start(self) -> int | None:
        """The first step of the decay (None until ``total_steps`` is known)."""
        if self.total_steps is None:
            return None
        return max(self.warmup_steps, self.total_steps - round(self.decay_fraction * self.total_steps))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start = self.decay_start()
        if start is None or step < start:
            return 1.0
        progress = min(1.0, (step - start) / (self.total_steps - start))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * DECAYS[self.decay](progress)
