"""Direct Preference Optimization (Rafailov et al., 2023): ``model.objective: xlabml.posttrain.dpo.DPO``.

For a prompt x with a chosen response y_c and a rejected one y_r, with log π(y | x) the sum of the policy's
log-probabilities of the response's tokens (and its ``<eos>``), and log π_ref the same for the frozen reference
model (the weights the run starts from)::

    loss = -log σ(β [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])

Logged for each stage: ``{stage}_loss``; ``{stage}_rewards/chosen`` and ``/rejected`` (β times the policy's
log-ratio to the reference, the implicit rewards), ``{stage}_rewards/margin`` (their difference);
``{stage}_acc`` (the share of pairs whose margin is positive: the policy prefers the chosen response more than
the reference does); ``{stage}_logps/chosen`` and ``/rejected`` (the policy's summed log-probabilities).

The reference is a frozen copy of the model taken at the first batch, before any update: the initial weights
(those of ``model.init_from``). Its log-probabilities are computed on the fly in the same step, one forward pass
without gradients (about a third more compute than the policy's forward and backward, and one more copy of the
weights, no optimizer state; its head runs ``loss_chunk_size`` tokens at a time, so it adds no full-size logits
to the policy's), rather than precomputed over the dataset once: nothing to cache or invalidate
when the data, its order or the windows change, and nothing that drifts from the batch it scores. A training
checkpoint holds the reference's weights (key ``xlab_dpo_reference``), so a resumed run keeps comparing with
the initial weights; exports and the loaders leave it out. Not supported under FSDP (the copy needs the whole
model on each process).

Batches: ``chosen_x``, ``chosen_y``, ``rejected_x``, ``rejected_y`` (b, t) from ``data.format: preference``.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlabml.losses import softcap_logits
from xlabml.posttrain.objective import Objective

REFERENCE_KEY = "xlab_dpo_reference"
_BATCH_KEYS = ("chosen_x", "chosen_y", "rejected_x", "rejected_y")


def sequence_logps(model: nn.Module, x: Tensor, y: Tensor, ignore_index: int, chunk_size: int | None = None
                   ) -> Tensor:
    """Summed log-probability of each row's targets: ``sum_t log p(y_t | x_<=t)`` over ``y != ignore_index``.

    Args:
        model: maps ids (b, t) to logits (b, t, v).
        x, y: inputs and targets (b, t).
        chunk_size: without gradients (the reference's pass), and for a model whose logits are its linear
            ``head`` of the hidden states (a ``Decoder`` without head-QK): apply the head and the log-softmax this
            many tokens at a time, so the whole (b, t, v) logits and their float32 copies are never held at once.
            Equal to the plain computation up to float rounding.
    Returns: (b,) float32.
    """
    head = getattr(model, "head", None)
    if (chunk_size and not torch.is_grad_enabled() and type(head) is nn.Linear
            and getattr(model, "head_qk", True) is None):
        hidden = model(x, return_hidden=True).flatten(0, 1)  # b*t c
        targets = y.flatten()
        cap = getattr(model, "logit_softcap", None)
        logps = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)  # b*t
        for start in range(0, len(targets), chunk_size):
            rows = slice(start, start + chunk_size)
            logits = head(hidden[rows])  # m v, in autocast's dtype as the plain head's
            if cap is not None:
                logits = softcap_logits(logits, cap).to(logits.dtype)
            logps[rows] = -F.cross_entropy(logits.float(), targets[rows], ignore_index=ignore_index, reduction="none")
        return logps.view(y.shape).sum(dim=1)
    logits = model(x)  # b t v
    nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=ignore_index, reduction="none")  # b t
    return -nll.sum(dim=1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """The DPO loss of each pair and the implicit rewards.

    Args: summed response log-probabilities (b,) of the policy and the reference, for chosen and rejected.
    Returns: ``(loss (b,), chosen_rewards (b,), rejected_rewards (b,))``, rewards being
        ``beta * (policy - reference)``; ``loss = -logsigmoid(chosen_rewards - rejected_rewards)``.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


class DPO(Objective):
    """The DPO objective (module docstring).

    Args:
        beta: strength of the pull towards the reference (the inverse temperature of the implicit reward); larger
            keeps the policy closer to the reference. Usual values 0.05-0.5.
    """

    def __init__(self, beta: float = 0.1):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"DPO beta={beta!r}: expected a number > 0")
        self.beta = float(beta)
        self._reference: list[nn.Module] = []  # a list: the copy stays out of the LightningModule's modules

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference model (None until the first batch or a restored checkpoint)."""
        return self._reference[0] if self._reference else None

    def set_reference(self, model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> nn.Module:
        """Make the reference a frozen copy of `model` (with `state_dict`'s weights when given)."""
        reference = copy.deepcopy(model)
        if getattr(reference, "_compiled_call_impl", None) is not None:
            reference._compiled_call_impl = None  # compiled for the original module's call, not the copy's
        if state_dict is not None:
            reference.load_state_dict(state_dict)
        self._reference[:] = [reference.eval().requires_grad_(False)]
        return reference

    def step(self, module, batch: dict[str, Tensor], stage: str) -> Tensor:
        missing = [key for key in _BATCH_KEYS if key not in batch]
        if missing:
            raise ValueError(f"model.objective DPO needs batches of preference pairs (data.format: preference); "
                             f"this batch lacks {missing}")
        if self.reference is None:
            if module._fsdp_root() is not None:
                raise ValueError("model.objective DPO does not run under FSDP: its reference is a whole copy of the "
                                 "model; use DDP or one device")
            self.set_reference(module.model)  # before any update: the initial weights
        reference = self.reference
        x = torch.cat([batch["chosen_x"], batch["rejected_x"]])  # 2b t
        y = torch.cat([batch["chosen_y"], batch["rejected_y"]])
        if next(reference.parameters()).device != x.device:  # restored before Lightning moved the module
            reference.to(x.device)
        ignore = module._ignore_index()
        policy = sequence_logps(module, x, y, ignore)  # 2b
        with torch.no_grad():
            baseline = sequence_logps(reference, x, y, ignore, chunk_size=module.loss_chunk_size)
        b = batch["chosen_x"].size(0)
        losses, chosen, rejected = dpo_loss(policy[:b], policy[b:], baseline[:b], baseline[b:], self.beta)
        loss = losses.mean()
        if stage == "train" and not module._logging_step():
            return loss
        on_step = stage == "train"
        margin = (chosen - rejected).detach()
        metrics = {"loss": loss, "acc": (margin > 0).float().mean(), "rewards/chosen": chosen.detach().mean(),
                   "rewards/rejected": rejected.detach().mean(), "rewards/margin": margin.mean(),
                   "logps/chosen": policy[:b].detach().mean(), "logps/rejected": policy[b:].detach().mean()}
        for name, value in metrics.items():
            module.log(f"{stage}_{name}", value, batch_size=b, prog_bar=name in ("loss", "acc"), on_step=on_step,
                       on_epoch=not on_step, sync_dist=not on_step)
        return loss

    def on_save_checkpoint(self, module, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:
            checkpoint[REFERENCE_KEY] = self.reference.state_dict()

    def on_load_checkpoint(self, module, checkpoint: dict[str, Any]) -> None:
        if REFERENCE_KEY in checkpoint:
            self.set_reference(module.model, checkpoint[REFERENCE_KEY])

    def __repr__(self) -> str:
        return f"DPO(beta={self.beta})"
