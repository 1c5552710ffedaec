import copy
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from xlabml.models import XLabModel
from xlabml.optim import LaProp, MuonAdamW, muon_lr_scale, orthogonalize
from xlabml.roles import parameter_roles, unwrapped_name


def tiny(**kwargs):
    torch.manual_seed(0)
    config = dict(n_vocab=64, max_len=16, d_model=32, n_layers=1, n_heads=4, d_ff=64, dropout=0.0) | kwargs
    return XLabModel(**config)


def batch(seed=0, b=4, t=16):
    x = torch.randint(4, 64, (b, t + 1), generator=torch.Generator().manual_seed(seed))
    return {'x': x[:, :-1], 'y': x[:, 1:]}


def train_steps(model, optimizer, steps, first_seed=0):
    for i in range(steps):
        loss = model.batch_loss(batch(first_seed + i), accuracy=False)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize('shape', [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize('nesterov', [True, False])
def test_muon_steps_equal_torch_muon(shape, nesterov):
    """Several steps on one matrix (wide, tall, square) give exactly torch.optim.Muon's parameters."""
    torch.manual_seed(0)
    ours_p = torch.nn.Parameter(torch.randn(shape))
    ref_p = torch.nn.Parameter(ours_p.detach().clone())
    ours = MuonAdamW([{'params': [ours_p], 'roles': ['matrix']}], lr=0.05, momentum=0.9, nesterov=nesterov,
                     weight_decay=0.1, adjust_lr='original')
    ref = torch.optim.Muon([ref_p], lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
                           adjust_lr_fn='original')
    for step in range(4):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        ours_p.grad, ref_p.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        assert torch.equal(ours_p, ref_p), f"step {step}"
    assert not torch.equal(ours_p, ref_p.new_zeros(shape))


def test_orthogonalize_maps_singular_values_near_one():
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    g = g * torch.logspace(-1, 1, 32)[:, None]  # rows scaled over 2 decades
    s = torch.linalg.svdvals(orthogonalize(g, dtype=torch.float32))
    assert s.min() > 0.5 and s.max() < 1.3  # Keller Jordan's iteration: about [0.7, 1.2]
    assert orthogonalize(g.T).shape == (48, 32)


def test_muon_lr_scale():
    assert muon_lr_scale((512, 128), 'original') == 2.0
    assert muon_lr_scale((128, 512), 'original') == 1.0
    assert muon_lr_scale((100, 400), 'match_rms_adamw') == pytest.approx(0.2 * 20)
    assert muon_lr_scale((100, 400), None) == 1.0


def test_muon_adamw_splits_parameters_by_role():
    model = tiny()
    opt = MuonAdamW(model.parameter_groups(), lr=0.02, adam_lr=1e-3, embedding_lr=5e-3, head_lr=2e-3,
                    adam_weight_decay=0.1, weight_decay=0.01)
    roles = parameter_roles(model.model)
    names = {id(p): unwrapped_name(n) for n, p in model.model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group['params']:
            role = roles[names[id(p)]]
            seen.add(names[id(p)])
            assert group['muon'] == (role == 'matrix'), names[id(p)]
            expected_lr = {'matrix': 0.02, 'embedding': 5e-3, 'head': 2e-3}.get(role, 1e-3)
            assert group['lr'] == expected_lr, names[id(p)]
            decays = role in ('matrix', 'head')
            assert group['weight_decay'] == ((0.01 if role == 'matrix' else 0.1) if decays else 0.0), names[id(p)]
    assert seen == set(names.values())
    assert opt.param_groups[0]['muon']  # the logged rate (group 0) is Muon's
    muon_names = {names[id(p)] for g in opt.param_groups if g['muon'] for p in g['params']}
    assert muon_names == {f'blocks.0.{m}.weight' for m in ('attn.qkv', 'attn.proj', 'ffn.fc', 'ffn.proj')}


def test_muon_adamw_adam_part_equals_torch_adamw():
    """The non-matrix parameters follow torch.optim.AdamW exactly (same betas, eps, decoupled decay); with
    Muon's rate at 0 the matrices stay where they are."""
    model = tiny()
    reference = copy.deepcopy(model)
    opt = MuonAdamW(model.parameter_groups(), lr=0.0, adam_lr=3e-3, adam_betas=(0.8, 0.9),
                    adam_weight_decay=0.1, fused=False)
    twin = dict(zip(model.parameters(), reference.parameters()))
    ref = torch.optim.AdamW([{'params': [twin[p] for p in g['params']], 'weight_decay': g['weight_decay'],
                              'lr': 0.0 if g['muon'] else g['lr']} for g in opt.param_groups],
                            betas=(0.8, 0.9), foreach=False)
    start = copy.deepcopy(model.state_dict())
    train_steps(model, opt, 3)
    train_steps(reference, ref, 3)
    roles = parameter_roles(model.model)
    for (name, p), q in zip(model.model.named_parameters(), reference.model.parameters()):
        if roles[name] == 'matrix':
            assert torch.equal(p, start[f'model.{name}']), name
        else:
            assert torch.allclose(p, q, rtol=0, atol=1e-7), name
            assert not torch.equal(p, start[f'model.{name}']), name


def test_muon_adamw_needs_roles_and_checks_values():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match='roles'):
        MuonAdamW([p])
    with pytest.raises(ValueError, match="adjust_lr='x'"):
        MuonAdamW([{'params': [p], 'roles': ['matrix']}], adjust_lr='x')
    with pytest.raises(ValueError, match='momentum=1.0'):
        MuonAdamW([{'params': [p], 'roles': ['matrix']}], momentum=1.0)
    with pytest.raises(ValueError, match='lr=-1'):
        MuonAdamW([{'params': [p], 'roles': ['matrix']}], lr=-1)


def test_muon_adamw_state_dict_resumes_exactly():
    """Three steps, then save; a fresh model and optimizer loaded from the state continue exactly as the
    uninterrupted run."""
    make = partial(MuonAdamW, lr=0.02, adam_lr=3e-3, adam_weight_decay=0.1)
    straight = tiny()
    opt = make(straight.parameter_groups())
    train_steps(straight, opt, 3)
    saved_model, saved_opt = copy.deepcopy(straight.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(straight, opt, 3, first_seed=3)

    resumed = tiny(d_model=32)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed.parameter_groups())
    opt2.load_state_dict(saved_opt)
    train_steps(resumed, opt2, 3, first_seed=3)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


class ClipRecorder(XLabModel):
    """Records the gradients' 2-norm after Lightning's clipping hook."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.__dict__.setdefault('clipped', []).append(torch.stack(grads).norm().item())


def test_muon_adamw_trains_with_lightning_and_gradient_clipping(tmp_path):
    """``model.optimizer: xlabml.optim.MuonAdamW`` in a Lightning fit: gradients are clipped to the bound before
    each step, and a tiny model learns a copy task."""
    rows = [batch(i, b=1) for i in range(8)]
    data = DataLoader([{'x': r['x'][0], 'y': r['x'][0]} for r in rows], batch_size=4)  # copy task: y = x
    torch.manual_seed(0)
    model = ClipRecorder(n_vocab=64, max_len=16, d_model=32, n_layers=1, n_heads=4, d_ff=64, dropout=0.0,
                         optimizer=partial(MuonAdamW, lr=0.02, adam_lr=1e-2))
    first = model.batch_loss(next(iter(data)))[0].item()
    trainer = L.Trainer(accelerator='cpu', max_steps=30, gradient_clip_val=0.5, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, data)
    assert isinstance(trainer.optimizers[0], MuonAdamW)
    assert len(model.clipped) == 30 and max(model.clipped) <= 0.5 + 1e-5
    assert trainer.callback_metrics['train_loss'] < 0.5 * first


def adam_reference(p, grads, lr, betas, eps, weight_decay):
    """LaProp written out from the paper's Algorithm 1 (with decoupled weight decay), one step per grad."""
    m, v, out = torch.zeros_like(p), torch.zeros_like(p), p.clone()
    for t, g in enumerate(grads, start=1):
        v = betas[1] * v + (1 - betas[1]) * g * g
        m = betas[0] * m + (1 - betas[0]) * g / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        out = out * (1 - lr * weight_decay) - lr * m / (1 - betas[0] ** t)
    return out


def test_laprop_equals_its_formula_and_adam_without_momentum():
    torch.manual_seed(0)
    start = torch.randn(5, 7)
    grads = [torch.randn(5, 7) for _ in range(4)]
    p = torch.nn.Parameter(start.clone())
    opt = LaProp([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    assert torch.allclose(p, adam_reference(start, grads, 0.01, (0.9, 0.99), 1e-8, 0.1), rtol=0, atol=1e-6)

    # with beta1 = 0 momentum is gone and LaProp is Adam (whose update is then g / (sqrt(v_hat) + eps))
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours, adam = LaProp([p], lr=0.01, betas=(0.0, 0.95), eps=1e-8), torch.optim.Adam([q], lr=0.01, betas=(0.0, 0.95))
    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        adam.step()
    assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_laprop_checks_values():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match='betas'):
        LaProp([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match='weight_decay'):
        LaProp([p], weight_decay=-0.1)


@pytest.mark.parametrize('rows', [(8, 8, 8), (12, 12), (16, 4, 4)])
def test_split_fused_muon_equals_separate_matrices(rows):
    """With split_fused, a weight stacking matrices by rows takes exactly the steps torch.optim.Muon takes on
    each matrix apart (shape factor included); without it, the steps of the whole."""
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(sum(rows), 8))
    plain = torch.nn.Parameter(stacked.detach().clone())
    parts = [torch.nn.Parameter(p.detach().clone()) for p in stacked.detach().split(list(rows))]
    settings = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    ours = MuonAdamW([{'params': [stacked], 'roles': ['matrix'], 'rows': [rows]}], split_fused=True, **settings)
    whole = MuonAdamW([{'params': [plain], 'roles': ['matrix'], 'rows': [rows]}], **settings)
    ref = torch.optim.Muon(parts, adjust_lr_fn='original', **settings)
    for step in range(3):
        grad = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(step))
        stacked.grad, plain.grad = grad.clone(), grad.clone()
        for p, g in zip(parts, grad.split(list(rows))):
            p.grad = g.clone()
        ours.step(), whole.step(), ref.step()
        assert torch.equal(stacked.detach(), torch.cat([p.detach() for p in parts])), f"step {step}"
    assert not torch.equal(stacked, plain)  # apart is not the same step as whole


def test_fused_rows_of_the_model_reach_muon_and_resume_from_old_state():
    from xlabml.roles import fused_rows
    model = tiny(position='rope', norm='rmsnorm', ffn='swiglu', n_kv_heads=2)
    rows = fused_rows(model.model)
    hidden = model.model.blocks[0].ffn.hidden
    assert rows == {'blocks.0.attn.qkv.weight': (32, 16, 16), 'blocks.0.ffn.fc.weight': (hidden, hidden)}
    groups = model.parameter_groups()
    named = dict(model.model.named_parameters())
    for group in groups:
        for p, row in zip(group['params'], group['rows']):
            name = next(n for n, q in named.items() if q is p)
            assert row == rows.get(name)
    optimizer = MuonAdamW(groups, split_fused=True)
    muon = optimizer.param_groups[0]
    assert muon['muon'] and sorted(r for r in muon['rows'] if r) == sorted(rows.values())
    train_steps(model, optimizer, 2)
    # a state dict saved before 'rows' and 'split_fused' existed still loads and steps (as whole matrices)
    state = copy.deepcopy(optimizer.state_dict())
    for group in state['param_groups']:
        del group['rows'], group['split_fused']
    old = MuonAdamW(model.parameter_groups(), split_fused=True)
    old.load_state_dict(state)
    before = model.model.blocks[0].attn.qkv.weight.detach().clone()
    train_steps(model, old, 1, first_seed=5)
    assert not torch.equal(before, model.model.blocks[0].attn.qkv.weight)


def test_batched_muon_equals_torch_muon_on_each_matrix():
    """Matrices of one shape (and the parts of split fused weights) are orthogonalised as one stack: each
    still takes torch.optim.Muon's step for it alone (exactly on x86 CPUs; bf16 rounding bounds it elsewhere)."""
    torch.manual_seed(0)
    shapes = [(24, 40), (24, 40), (40, 24), (24, 40), (16, 16), (40, 24)]
    ours_p = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = MuonAdamW([{'params': ours_p, 'roles': ['matrix'] * len(shapes)}], lr=0.05, momentum=0.9,
                     weight_decay=0.1)
    ref = torch.optim.Muon(ref_p, lr=0.05, momentum=0.9, weight_decay=0.1, adjust_lr_fn='original')
    for step in range(3):
        for i, (a, b) in enumerate(zip(ours_p, ref_p)):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(10 * step + i))
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(ours_p[0], ours_p[1])
