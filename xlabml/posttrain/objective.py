"""What a model trains for, when it is not next-token cross-entropy: the ``objective`` option of ``XLabModel``.

An objective is configuration of a run, like the optimizer: it is not saved in the model's hyperparameters, so
the checkpoints of a run with an objective load as plain ``XLabModel`` checkpoints (for inference, export,
serving). State it must keep across a resume (DPO's reference weights) goes into the training checkpoint under
a key of its own, which exports leave out.
"""
from __future__ import annotations

from typing import Any

import torch


class Objective:
    """Base class of ``model.objective`` (YAML: ``class_path`` of a subclass and its ``init_args``).

    ``XLabModule`` calls ``step`` instead of its own loss for every train, validation and test batch, and passes
    its checkpoint hooks on. A subclass logs its own metrics (``{stage}_loss`` at least: checkpoints monitor it).
    """

    def step(self, module, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """The loss of one batch (a scalar to minimize) for `stage` (``train``, ``val`` or ``test``)."""
        raise NotImplementedError

    def on_save_checkpoint(self, module, checkpoint: dict[str, Any]) -> None:
        """Add what a resumed run needs to a training checkpoint (a key of its own)."""

    def on_load_checkpoint(self, module, checkpoint: dict[str, Any]) -> None:
        """Restore what ``on_save_checkpoint`` added (called before any step of a resumed run)."""
