"""Optimizers beyond torch's defaults, chosen from YAML under ``model.optimizer``.

``MuonAdamW``: Muon (momentum, then the update orthogonalised by a Newton-Schulz iteration; Jordan et al. 2024,
the optimizer of the modded-nanogpt speedrun) for the hidden matrices, AdamW for everything else (token and
position embeddings, the head, norm gains, biases), in one optimizer with one state dict::

    model:
      optimizer:
        class_path: xlabml.optim.MuonAdamW
        init_args: {lr: 0.02, adam_lr: 0.002, adam_betas: [0.9, 0.99], weight_decay: 0.0, adam_weight_decay: 0.1}

Which parameters are "hidden matrices" is decided by role (``xlabml.roles``: role ``matrix``), never by shape,
so the choice is the same when FSDP has flattened every parameter into a 1-D shard. Muon needs the matrix as a
matrix, though: under FSDP (``attach_fsdp``, called by ``XLabModule.configure_optimizers``) each rank's slice
of a matrix's update is summed into a zero-filled full-size buffer over the shard group (an all-reduce of
disjoint slices: every rank then holds the whole update), every rank orthogonalises the whole matrix, and keeps
its own slice. The result is the single-process update; the cost is one all-reduce of each matrix's update per
step (twice an all-gather's traffic) and the Newton-Schulz iteration repeated on every rank. At large scale the
known remedy is to give each rank a share of the matrices and all-gather the results (Moonlight's
"distributed Muon"); it is not implemented here. Under DDP every rank holds the same averaged gradients and
computes the same update.

``LaProp`` (Ziyin et al. 2020): Adam with the momentum taken of the already normalised gradient, which decouples
momentum from adaptivity (used by LSWT); decoupled weight decay as in AdamW.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adamw import adamw

# Newton-Schulz coefficients of Keller Jordan's Muon (as torch.optim.Muon): a quintic iteration with the largest
# slope at zero, which maps every singular value into about [0.7, 1.2] in 5 steps
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_ROLES = frozenset({'matrix'})
EMBEDDING_ROLES = frozenset({'embedding', 'position'})


def orthogonalize(update: Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately ``U V^T`` of ``update = U S V^T`` (a 2-D tensor, or a stack of them: n, rows, cols), by
    ``steps`` Newton-Schulz iterations in ``dtype`` (bf16 as in the reference implementation); returns a tensor
    of that dtype and ``update``'s shape."""
    a, b, c = coefficients
    addmm = torch.addmm if update.dim() == 2 else torch.baddbmm  # a stack: one batched call per step for all
    x = update.to(dtype)
    tall = update.size(-2) > update.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_lr_scale(shape, adjust_lr: str | None) -> float:
    """The factor Muon multiplies its learning rate by for a matrix of ``shape`` (out, in): ``'original'``
    (Keller Jordan's) sqrt(max(1, out / in)); ``'match_rms_adamw'`` (Moonlight's) 0.2 sqrt(max(out, in)), which
    makes the update's RMS that of AdamW so AdamW's learning rate and weight decay carry over; None: 1."""
    rows, cols = shape[0], shape[1]
    if adjust_lr == 'original':
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == 'match_rms_adamw':
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def row_parts(update: Tensor, rows) -> list[tuple[int, int, Tensor]]:
    """``[(first row, last row + 1, rows of update)]`` of the matrices a 2-D ``update`` stacks, ``rows`` their row
    counts (None: the whole as one matrix)."""
    if rows is None:
        return [(0, update.size(0), update)]
    if sum(rows) != update.size(0):
        raise ValueError(f"MuonAdamW: rows {tuple(rows)} do not add up to the {update.size(0)} rows of a "
                         f"{tuple(update.shape)} matrix")
    bounds = [0, *itertools.accumulate(rows)]
    return list(zip(bounds, bounds[1:], update.split(list(rows), dim=0)))


def muon_updates(update: Tensor, rows, steps: int, adjust_lr: str | None, dtype: torch.dtype):
    """Muon's step directions for a 2-D momentum ``update``: ``[(first row, last row + 1, direction, factor)]``,
    each direction orthogonalised (``orthogonalize``, in ``update``'s dtype) and its shape factor
    (``muon_lr_scale``), one per matrix of ``row_parts(update, rows)``."""
    return [(lo, hi, orthogonalize(part, steps, eps=1e-7, dtype=dtype).to(update.dtype),
             muon_lr_scale(part.shape, adjust_lr)) for lo, hi, part in row_parts(update, rows)]


class MuonAdamW(Optimizer):
    """Muon for parameters of role ``matrix``, AdamW for the rest.

    Args:
        params: parameter groups as ``XLabModule.parameter_groups`` makes them: each group has ``params`` and
            ``roles`` (the ``xlabml.roles`` role of each parameter, in order); a group's ``weight_decay``, when
            given (0.0 for the no-decay group), overrides the defaults below.
        lr: Muon's learning rate (before the shape factor, see ``adjust_lr``).
        momentum, nesterov: Muon's momentum (an exponential average, as in torch.optim.Muon) and Nesterov update.
        ns_steps: Newton-Schulz iterations.
        weight_decay: decoupled weight decay of the Muon matrices (``p *= 1 - lr * weight_decay``).
        adjust_lr: ``'original'``, ``'match_rms_adamw'`` or None; see ``muon_lr_scale``.
        adam_lr, adam_betas, adam_eps, adam_weight_decay: AdamW for the other parameters.
        embedding_lr, head_lr: AdamW learning rates of the embedding/position tables and of an untied head
            (default ``adam_lr``).
        fused: AdamW's fused kernel (default: on CPU, where it saves about 2 ms a step on the reference model).
        ns_dtype: dtype of the Newton-Schulz iteration (``'bfloat16'`` as the reference, or ``'float32'``).
        split_fused: orthogonalise each matrix of a weight that stacks several (attention's query, key and value
            rows in ``qkv``, SwiGLU's gate and up rows in ``fc``: the groups' ``rows``, ``xlabml.roles.fused_rows``)
            on its own, each with its own shape factor, as if they were separate layers (the speedrun's Muon sees
            q, k and v apart). False: the stacked weight as one matrix.

    Each of its groups holds ``muon`` (bool) and ``roles``; schedulers scale every group's rate by the same
    factor. The optimizer does not claim to unscale gradients itself, so gradient clipping works under every
    precision plugin.
    """

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, adjust_lr: str | None = 'original',
                 adam_lr: float = 3e-3, adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                 adam_weight_decay: float = 0.0, embedding_lr: float | None = None, head_lr: float | None = None,
                 fused: bool | None = None, ns_dtype: str = 'bfloat16', split_fused: bool = False):
        if adjust_lr not in (None, 'original', 'match_rms_adamw'):
            raise ValueError(f"adjust_lr={adjust_lr!r}: expected 'original', 'match_rms_adamw' or None")
        for name, value in (('lr', lr), ('adam_lr', adam_lr), ('weight_decay', weight_decay),
                            ('adam_weight_decay', adam_weight_decay), ('embedding_lr', embedding_lr or 0.0),
                            ('head_lr', head_lr or 0.0)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name}={value!r}: expected a number >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}: expected a number in [0, 1)")
        if not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
            raise ValueError(f"ns_steps={ns_steps!r}: expected an int in 1..99")
        if ns_dtype not in ('bfloat16', 'float32'):
            raise ValueError(f"ns_dtype={ns_dtype!r}: expected 'bfloat16' or 'float32'")
        groups = []
        for group in _groups(params):
            roles = group.get('roles')
            if roles is None or len(roles) != len(group['params']):
                raise ValueError("MuonAdamW needs parameter groups with the role of every parameter ('roles', as "
                                 "XLabModule.parameter_groups makes them): Muon is for hidden matrices only")
            rows = group.get('rows') or [None] * len(roles)
            if len(rows) != len(roles):
                raise ValueError(f"a parameter group lists {len(rows)} 'rows' for {len(roles)} parameters")
            split = {}  # (muon, lr) -> params, roles, rows
            for p, role, row in zip(group['params'], roles, rows):
                if role in MUON_ROLES:
                    key = (True, lr)
                elif role in EMBEDDING_ROLES:
                    key = (False, adam_lr if embedding_lr is None else embedding_lr)
                elif role == 'head':
                    key = (False, adam_lr if head_lr is None else head_lr)
                else:
                    key = (False, adam_lr)
                split.setdefault(key, ([], [], []))
                split[key][0].append(p)
                split[key][1].append(role)
                split[key][2].append(None if row is None else tuple(row))
            for (muon, group_lr), (ps, rs, rows) in split.items():
                decay = group.get('weight_decay', weight_decay if muon else adam_weight_decay)
                groups.append({'params': ps, 'roles': rs, 'rows': rows, 'muon': muon, 'lr': group_lr,
                               'weight_decay': decay})
        groups.sort(key=lambda g: not g['muon'])  # Muon first: param_groups[0]['lr'] is the logged rate
        tensors = [p for g in groups for p in g['params']]
        if fused is None:
            fused = all(p.device.type == 'cpu' and p.is_floating_point() for p in tensors)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, adjust_lr=adjust_lr,
                        betas=tuple(adam_betas), eps=adam_eps, weight_decay=weight_decay, fused=bool(fused),
                        ns_dtype=ns_dtype, split_fused=bool(split_fused), muon=False, roles=None, rows=None)
        super().__init__(groups, defaults)
        self._shards: dict[int, tuple] = {}  # id(parameter) -> (full shape, start, stop, process group)

    def attach_fsdp(self, root) -> None:
        """Learn where each Muon matrix's FSDP shard sits in the whole matrix (FSDP1 with ``use_orig_params``:
        every parameter is a 1-D slice of the flattened original), so ``step`` can orthogonalise whole matrices.
        ``root``: the root ``FullyShardedDataParallel`` module."""
        from torch.distributed.fsdp import FullyShardedDataParallel
        for unit in FullyShardedDataParallel.fsdp_modules(root):
            handle = unit._handle
            if handle is None:
                continue
            flat = handle.flat_param
            if not getattr(flat, '_params', None):
                raise ValueError("MuonAdamW under FSDP needs use_orig_params=True (Lightning's default)")
            for p, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos):
                start, stop = (info.intra_param_start_idx, info.intra_param_end_idx + 1) if info.in_shard else (0, 0)
                self._shards[id(p)] = (tuple(shape), start, stop, unit.process_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group['muon']:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group):
        lr, wd, momentum = group['lr'], group['weight_decay'], group['momentum']
        dtype = getattr(torch, group['ns_dtype'])
        # a group restored from a checkpoint written before these keys existed has neither
        split = group.get('split_fused', False)
        all_rows = group.get('rows') or [None] * len(group['params'])
        whole = []  # (parameter, rows) of the matrices held whole by this process
        for p, rows in zip(group['params'], all_rows):
            rows = rows if split else None
            shard = self._shards.get(id(p))
            if shard is None and p.grad is None:
                continue
            if shard is None and p.dim() != 2:
                raise ValueError(f"MuonAdamW: a matrix parameter of shape {tuple(p.shape)} is not 2-D and no FSDP "
                                 "shard layout is known for it (attach_fsdp)")
            if shard is None:
                whole.append((p, rows))
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p)  # FSDP: every rank takes part
            state = self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state['momentum_buffer']
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group['nesterov'] else buf
            steps, adjust = group['ns_steps'], group['adjust_lr']
            shape, start, stop, process_group = shard
            full = torch.zeros(math.prod(shape), dtype=update.dtype, device=update.device)
            full[start:stop] = update.flatten()
            torch.distributed.all_reduce(full, group=process_group)  # disjoint slices: a sum is a gather
            parts = muon_updates(full.view(shape), rows, steps, adjust, dtype)
            if len(parts) == 1:  # one factor: as the single-process step, the factor in the rate
                factor = parts[0][3]
                update = parts[0][2].flatten()[start:stop].view_as(p)
            else:
                factor = 1.0
                update = torch.cat([d * f for _, _, d, f in parts]).flatten()[start:stop].view_as(p)
            p.mul_(1 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr * factor)
        if whole:
            self._muon_whole(group, whole, dtype)

    def _muon_whole(self, group, whole, dtype):
        """Muon's step for matrices held whole (no FSDP), batched: the momentum updates as foreach ops, and one
        Newton-Schulz iteration per shape for every matrix (or fused part) of that shape, stacked. The same
        arithmetic per element as one matrix at a time (tests: equal to torch.optim.Muon)."""
        lr, wd, momentum = group['lr'], group['weight_decay'], group['momentum']
        params = [p for p, _ in whole]
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state['momentum_buffer'])
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group['nesterov'] else bufs
        by_shape = {}  # (rows, cols) -> [(parameter, first row, last row + 1, update)]
        for (p, rows), update in zip(whole, updates):
            for lo, hi, part in row_parts(update, rows):
                by_shape.setdefault(tuple(part.shape), []).append((p, lo, hi, part))
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        for shape, items in by_shape.items():
            stacked = items[0][3] if len(items) == 1 else torch.stack([part for *_, part in items])
            directions = orthogonalize(stacked, group['ns_steps'], eps=1e-7, dtype=dtype)
            directions = [directions] if len(items) == 1 else directions.unbind(0)
            targets = [p[lo:hi] for p, lo, hi, _ in items]
            torch._foreach_add_(targets, [d.to(t.dtype) for d, t in zip(directions, targets)],
                                alpha=-lr * muon_lr_scale(shape, group['adjust_lr']))

    def _adamw(self, group):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group['params']:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state['step'] = (torch.zeros((), dtype=torch.float32, device=p.device) if group['fused']
                                 else torch.tensor(0.0, dtype=torch.float32))
                state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state['exp_avg'])
            exp_avg_sqs.append(state['exp_avg_sq'])
            steps.append(state['step'])
        if not params:
            return
        beta1, beta2 = group['betas']
        adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=group['fused'] or None,
              foreach=None if group['fused'] else False, amsgrad=False, beta1=beta1, beta2=beta2, lr=group['lr'],
              weight_decay=group['weight_decay'], eps=group['eps'], maximize=False)


class LaProp(Optimizer):
    """LaProp (Ziyin et al. 2020, "LaProp: Separating Momentum and Adaptivity in Adam"):

        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_t = beta1 m_{t-1} + (1 - beta1) g_t / (sqrt(v_t / (1 - beta2^t)) + eps)
        p_t = p_{t-1} (1 - lr weight_decay) - lr m_t / (1 - beta1^t)

    Adam normalises the momentum; LaProp takes the momentum of normalised gradients, so ``beta1`` and ``beta2``
    may be chosen independently (no ``beta1 <= sqrt(beta2)`` divergence). Takes parameter groups as AdamW does
    (``weight_decay`` per group); the learning rate multiplies the update at the step (a schedule acts at once,
    unlike the reference code, which folds the rate into the momentum).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-15, weight_decay: float = 0.0):
        if not lr >= 0:
            raise ValueError(f"lr={lr!r}: expected a number >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas={betas!r}: expected two numbers in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r}: expected a number >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state['step'] = 0
                    state['exp_avg'] = torch.zeros_like(p, dtype=torch.float32)
                    state['exp_avg_sq'] = torch.zeros_like(p, dtype=torch.float32)
                state['step'] += 1
                t, m, v = state['step'], state['exp_avg'], state['exp_avg_sq']
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(group['eps'])
                m.mul_(beta1).addcdiv_(grad, denom, value=1 - beta1)
                p.mul_(1 - group['lr'] * group['weight_decay'])
                p.add_((m / (1 - beta1 ** t)).to(p.dtype), alpha=-group['lr'])
        return loss


def _groups(params) -> list[dict]:
    params = list(params)
    if not params:
        raise ValueError("the optimizer got no parameters")
    return [dict(g) if isinstance(g, dict) else {'params': [g]} for g in params]
