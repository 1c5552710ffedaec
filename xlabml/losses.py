"""Cross-entropy of a linear head without materialising the logits of the whole batch.

The release run's loss sees 256 x 512 rows of 32,768 logits each (2^32 numbers): the plain loss keeps them in
the model's dtype, casts them to float32 and keeps the float32 log-softmax for backward, about 50 GB.
``linear_cross_entropy`` applies the head to a chunk of rows at a time and computes that chunk's loss *and its
gradients* at once (the loss is the last thing before backward, so the gradient of the logits is known in the
forward pass: softmax minus one-hot), keeping only the gradients of the hidden states (rows x width), the head's
weight and its bias; backward only scales those (in place: it runs once). Peak memory is two float32 chunks of
logits and the head's float32 weight gradient, whatever the batch; the work is the same three matrix products as
the plain loss (forward, and the two of backward), so nothing is recomputed. ``bench/memory.py`` measures both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                         ignore_index: int = -100, chunk_size: int = 8192, accuracy: bool = True
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
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
    Returns:
        (summed loss: float32 scalar, number of counted rows: long scalar, rows predicted right: long scalar or
        None without ``accuracy``). Gradients reach ``hidden``, ``weight`` and ``bias`` through the summed loss.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden, targets = hidden.flatten(0, -2), targets.flatten()  # n c, n
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    nll, correct = _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk_size, dtype,
                                             needs_grad, accuracy)
    return nll, (targets != ignore_index).sum(), correct if accuracy else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk_size, dtype, needs_grad, accuracy):
        n = hidden.size(0)
        with torch.autocast(hidden.device.type, enabled=False):  # casts are explicit: dtype is autocast's
            w = weight.to(dtype)  # v c
            b = bias.to(dtype) if bias is not None else None
            nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            if needs_grad:
                grad_hidden = torch.empty_like(hidden)  # n c
                grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))  # v c
                grad_bias = torch.zeros_like(bias, dtype=grad_weight.dtype) if bias is not None else None  # v
            for start in range(0, n, chunk_size):
                rows = slice(start, start + chunk_size)
                h, y = hidden[rows].to(dtype), targets[rows]  # m c, m
                valid = y != ignore_index  # m
                logits = F.linear(h, w, b).float()  # m v, rounded to `dtype` first as the plain head's are
                if accuracy:
                    correct += ((logits.argmax(dim=-1) == y) & valid).sum()
                logp = torch.log_softmax(logits, dim=-1)  # m v
                del logits  # at most two m x v float32 tensors at a time
                y = y.masked_fill(~valid, 0)[:, None]  # m 1, any class for ignored rows: masked below
                nll -= logp.gather(1, y).squeeze(1).masked_fill(~valid, 0.0).sum()
                if not needs_grad:
                    continue
                # d(nll)/d(logits) = softmax - one_hot; ignored rows are zeroed through their (cheaper) m x c
                # factors rather than in the m x v gradient
                grad = logp.exp_().scatter_add_(1, y, logp.new_full(y.shape, -1.0))  # m v, float32
                del logp
                keep = valid[:, None]  # m 1
                if grad_bias is not None:
                    grad_bias += (grad.T @ keep.to(grad.dtype)).squeeze(1).to(grad_bias.dtype)  # v
                low = grad.to(dtype)  # m v, as the plain loss's gradient reaches the head's matmul
                grad_hidden[rows] = (low @ w) * keep  # m c
                _add_matmul(grad_weight, low, grad, h * keep)  # v c
                del grad, low
        ctx.used = False
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
            ctx.dtypes = weight.dtype, bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(correct)
        return nll, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll, grad_correct):
        # the gradients were computed for d(loss)/d(nll) = 1: scale them in place (a second copy of the head's
        # weight gradient would cost as much memory as the weight), which allows one backward only
        if ctx.used:
            raise RuntimeError("linear_cross_entropy scales its stored gradients in place: its backward can run "
                               "once (retain_graph=True is not supported)")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_nll.float()  # a scalar
        weight_dtype, bias_dtype = ctx.dtypes
        grads = [grad_hidden.mul_(scale.to(grad_hidden.dtype)), grad_weight.mul_(scale).to(weight_dtype),
                 grad_bias.mul_(scale).to(bias_dtype) if grad_bias is not None else None]
        return (*grads, None, None, None, None, None, None)


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
