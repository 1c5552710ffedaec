"""Cross-entropy of a linear head without materialising the logits of the whole batch.

The release run's loss sees 256 x 512 rows of 32,768 logits each (2^32 numbers): the plain loss keeps them in
the model's dtype, casts them to float32 and keeps the float32 log-softmax for backward, about 50 GB.
``linear_cross_entropy`` applies the head to a chunk of rows at a time and computes that chunk's loss *and its
gradients* at once (the loss is the last thing before backward, so the gradient of the logits is known in the
forward pass: softmax minus one-hot), keeping only the gradients of the hidden states (rows x width), the head's
weight and its bias; backward only scales those (in place: it runs once). Peak memory is two float32 chunks of
logits and the head's float32 weight gradient, whatever the batch; the work is the same three matrix products as
the plain loss (forward, and the two of backward), so nothing is recomputed. ``bench/memory.py`` measures both.

Two stabilisers act on the logits in both paths with the same numbers (``softcap_logits``, ``cross_entropy``):
logit soft-capping (``cap * tanh(logits / cap)``, Gemma 2; part of the model, so inference sees it too) and the
z-loss (PaLM: ``z_loss * logsumexp(logits)^2`` per counted row, added to the objective only, which keeps the
log-partition near 0 so bf16 logits stay precise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softcap_logits(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)`` computed in float32 (returned in float32), or ``logits`` as they are when
    ``cap`` is None: every logit within (-cap, cap), with slope 1 near 0."""
    if cap is None:
        return logits
    return torch.tanh(logits.float() / cap) * cap  # not in place: tanh's backward reads its output


def cross_entropy(logits: Tensor, targets: Tensor, *, ignore_index: int = -100, z_loss: float = 0.0
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """The plain path's summed objective: cross-entropy plus ``z_loss`` times the squared log-partition, over
    the rows whose target is not ``ignore_index``, in float32.

    Args:
        logits: (..., v), already soft-capped if the model caps them.
        targets: (...) class ids.
    Returns:
        (summed objective, stats): ``stats`` holds detached sums ``nll`` and ``lse_sq`` (of logsumexp^2) over the
        counted rows and ``logit_absmax`` (the largest |logit| of the batch), as ``linear_cross_entropy`` gives.
    """
    logits, targets = logits.flatten(0, -2).float(), targets.flatten()
    nll = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction='sum')
    lse = torch.logsumexp(logits, dim=-1)  # n
    lse_sq = (lse.square() * (targets != ignore_index)).sum()
    objective = nll + z_loss * lse_sq if z_loss else nll
    stats = {'nll': nll.detach(), 'lse_sq': lse_sq.detach(), 'logit_absmax': logits.detach().abs().max()}
    return objective, stats


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                         ignore_index: int = -100, chunk_size: int = 8192, accuracy: bool = True,
                         z_loss: float = 0.0, softcap: float | None = None, return_stats: bool = False):
    """Summed cross-entropy of ``F.linear(hidden, weight, bias)`` against ``targets``, in chunks of rows.

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction='sum')`` (and its
    gradients), with the logits in autocast's dtype when autocast is on, as the plain head would compute them.

    Args:
        hidden: final hidden states (..., c), any float dtype.
        weight: head weight (v, c) (a tied embedding table works the same).
        bias: head bias (v,) or None.
        targets: class ids (...), ``ignore_index`` where the row does not count.
        chunk_size: rows per chunk; the memory it takes is about 2 x chunk_size x v x 4 bytes (two float32
            chunks of logits), plus the gradients (the inputs' sizes, the weight's in float32).
        accuracy: also count the rows whose argmax is the target.
        z_loss: add ``z_loss * logsumexp(logits)^2`` of each counted row to the summed loss (and its gradient).
        softcap: soft-cap the logits (``softcap_logits``) before the loss, as a capped model's head does.
        return_stats: also return the stats of ``cross_entropy`` (detached sums ``nll``, ``lse_sq`` and the
            largest |logit|, ``logit_absmax``).
    Returns:
        (summed loss: float32 scalar, number of counted rows: long scalar, rows predicted right: long scalar or
        None without ``accuracy``[, stats]). Gradients reach ``hidden``, ``weight`` and ``bias`` through the
        summed loss.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden, targets = hidden.flatten(0, -2), targets.flatten()  # n c, n
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    loss, correct, nll, lse_sq, absmax = _LinearCrossEntropy.apply(
        hidden, weight, bias, targets, ignore_index, chunk_size, dtype, needs_grad, accuracy, float(z_loss), softcap)
    out = loss, (targets != ignore_index).sum(), correct if accuracy else None
    return (*out, {'nll': nll, 'lse_sq': lse_sq, 'logit_absmax': absmax}) if return_stats else out


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk_size, dtype, needs_grad, accuracy, z_loss,
                softcap):
        n = hidden.size(0)
        with torch.autocast(hidden.device.type, enabled=False):  # casts are explicit: dtype is autocast's
            w = weight.to(dtype)  # v c
            b = bias.to(dtype) if bias is not None else None
            nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
            lse_sq = torch.zeros((), dtype=torch.float32, device=hidden.device)
            absmax = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            if needs_grad:  # only the gradients asked for: a frozen head (LoRA) skips the v x c product per chunk
                need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
                grad_dtype = torch.promote_types(weight.dtype, torch.float32)
                grad_hidden = torch.empty_like(hidden) if need_hidden else None  # n c
                grad_weight = torch.zeros_like(weight, dtype=grad_dtype) if need_weight else None  # v c
                grad_bias = torch.zeros_like(bias, dtype=grad_dtype) if need_bias else None  # v
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                h, y = hidden[rows].to(dtype), targets[rows]  # m c, m
                valid = y != ignore_index  # m
                logits = F.linear(h, w, b).float()  # m v, rounded to `dtype` first as the plain head's are
                if softcap is not None:  # softcap_logits, in place
                    logits = logits.div_(softcap).tanh_().mul_(softcap)
                absmax = torch.maximum(absmax, logits.abs().max())
                if accuracy:
                    correct += ((logits.argmax(dim=-1) == y) & valid).sum()
                lse = torch.logsumexp(logits, dim=-1)  # m
                lse_sq += (lse.square() * valid).sum()
                logp = torch.log_softmax(logits, dim=-1)  # m v
                # with a cap, d(capped)/d(raw) = 1 - (capped / cap)^2 takes the logits' place: at most two m x v
                # float32 tensors at a time
                slope = logits.div_(softcap).square_().neg_().add_(1.0) if softcap is not None and needs_grad else None
                del logits
                y = y.masked_fill(~valid, 0)[:, None]  # m 1, any class for ignored rows: masked below
                nll -= logp.gather(1, y).squeeze(1).masked_fill(~valid, 0.0).sum()
                if not needs_grad:
                    continue
                # d(nll)/d(logits) = softmax - one_hot, plus 2 z_loss lse softmax for the z-loss; ignored rows are
                # zeroed through their (cheaper) m x c factors rather than in the m x v gradient
                grad = logp.exp_()  # m v, float32
                del logp
                if z_loss:
                    grad.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
                grad.scatter_add_(1, y, grad.new_full(y.shape, -1.0))
                if slope is not None:
                    grad.mul_(slope)
                    del slope
                keep = valid[:, None]  # m 1
                if grad_bias is not None:
                    grad_bias += (grad.T @ keep.to(grad.dtype)).squeeze(1).to(grad_bias.dtype)  # v
                low = grad.to(dtype)  # m v, as the plain loss's gradient reaches the head's matmul
                if grad_hidden is not None:
                    grad_hidden[rows] = (low @ w) * keep  # m c
                if grad_weight is not None:
                    _add_matmul(grad_weight, low, grad, h * keep)  # v c
                del grad, low
        ctx.used = False
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
            ctx.dtypes = weight.dtype, bias.dtype if bias is not None else None
        loss = nll + z_loss * lse_sq if z_loss else nll.clone()
        ctx.mark_non_differentiable(correct, nll, lse_sq, absmax)
        return loss, correct, nll, lse_sq, absmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll, *_):
        # the gradients were computed for d(loss)/d(nll) = 1: scale them in place (a second copy of the head's
        # weight gradient would cost as much memory as the weight), which allows one backward only
        if ctx.used:
            raise RuntimeError("linear_cross_entropy scales its stored gradients in place: its backward can run "
                               "once (retain_graph=True is not supported)")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_nll.float()  # a scalar
        weight_dtype, bias_dtype = ctx.dtypes
        grads = [grad_hidden.mul_(scale.to(grad_hidden.dtype)) if grad_hidden is not None else None,
                 grad_weight.mul_(scale).to(weight_dtype) if grad_weight is not None else None,
                 grad_bias.mul_(scale).to(bias_dtype) if grad_bias is not None else None]
        return (*grads, None, None, None, None, None, None, None, None)


_MIXED_ADDMM = [True]  # whether torch.addmm takes out_dtype here (CUDA, recent torch); cleared on first failure
_BLOCK = 4096  # vocabulary rows per bf16 product where neither in-place path applies


def _add_matmul(total, grad, grad32, h):
    """``total += grad.T @ h`` for the head's weight gradient (v c), accumulated in ``total``'s float32:
    ``grad`` (m v) and ``h`` (m c) are in the compute dtype, ``grad32`` is ``grad`` before rounding to it."""
    if grad.dtype == total.dtype:
        total.addmm_(grad.T, h)
    elif not total.is_cuda:  # no mixed-dtype matmul on CPU: a float32 one, in place, beats a bf16 product that
        total.addmm_(grad32.T, h.to(total.dtype))  # is then converted and added (v x c memory traffic per chunk)
    elif _MIXED_ADDMM[0]:
        try:  # bf16 operands, float32 accumulation and output: no bf16 product to convert and add
            total.copy_(torch.addmm(total, grad.T, h, out_dtype=total.dtype))
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_ADDMM[0] = False
            _add_matmul(total, grad, grad32, h)
    else:
        for start in range(0, total.size(0), _BLOCK):  # float32 temporaries of a block of rows at a time
            total[start:start + _BLOCK] += (grad.T[start:start + _BLOCK] @ h).to(total.dtype)
