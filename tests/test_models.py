import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from xlabml.losses import cross_entropy, linear_cross_entropy, softcap_logits
from xlabml.models import XLabModel, default_optimizer
from xlabml.roles import parameter_roles, unwrapped_name
from xlabml.schedules import WSD, WarmupCosine

PAD = 3
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.")


def tiny(**kwargs):
    torch.manual_seed(0)
    config = dict(n_vocab=128, max_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0) | kwargs
    return XLabModel(**config)


def char_batches(seq_len=32, batch_size=8):
    ids = torch.tensor([ord(c) for c in TEXT])
    rows = [{'x': ids[i:i + seq_len], 'y': ids[i + 1:i + seq_len + 1]}
            for i in range(0, len(ids) - seq_len - 1, seq_len // 2)]
    return DataLoader(rows, batch_size=batch_size, shuffle=False)


def trainer(tmp_path, **kwargs):
    config = dict(accelerator='cpu', devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                  num_sanity_val_steps=0) | kwargs
    return L.Trainer(**config)


@pytest.mark.slow
def test_tiny_model_overfits_short_text(tmp_path):
    model = tiny(d_model=64, n_heads=4, d_ff=128, position='rope', norm='rmsnorm', ffn='swiglu',
                 optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))
    fit = trainer(tmp_path, max_steps=300, limit_val_batches=0, log_every_n_steps=1)
    fit.fit(model, char_batches(batch_size=16))
    assert fit.callback_metrics['train_loss'] < 0.1
    assert fit.callback_metrics['train_acc'] > 0.97
    assert fit.callback_metrics['tokens/s'] > 0


def test_loss_ignores_pad_and_validation_is_token_weighted(tmp_path):
    model = tiny()
    x = torch.randint(4, 128, (2, 2, 10), generator=torch.Generator().manual_seed(0))
    y = torch.randint(4, 128, (2, 2, 10), generator=torch.Generator().manual_seed(1))
    y[0, 0, 3:] = PAD  # first batch: 3 + 10 targets, second: 20
    batches = [{'x': x[i], 'y': y[i]} for i in range(2)]
    model.eval()
    with torch.no_grad():
        logits = [model(b['x']) for b in batches]
        loss, n, _ = model.loss(logits[0], batches[0]['y'])
        assert n == 13
        keep = batches[0]['y'] != PAD
        assert torch.allclose(loss, F.cross_entropy(logits[0][keep], batches[0]['y'][keep]))
        scrambled = logits[0].clone()
        scrambled[~keep] = torch.randn_like(scrambled[~keep]) * 100  # logits at pad targets do not matter
        assert torch.allclose(model.loss(scrambled, batches[0]['y'])[0], loss)
        nll = sum(F.cross_entropy(lg[b['y'] != PAD], b['y'][b['y'] != PAD], reduction='sum')
                  for lg, b in zip(logits, batches))
    token_mean = (nll / 33).item()
    metrics = trainer(tmp_path).validate(model, DataLoader(batches, batch_size=None), verbose=False)[0]
    assert metrics['val_loss'] == pytest.approx(token_mean, rel=1e-5)  # not the mean of the two batch means
    assert metrics['val_ppl'] == pytest.approx(math.exp(token_mean), rel=1e-4)
    assert metrics['val_bpt'] == pytest.approx(token_mean / math.log(2), rel=1e-5)
    assert 0.0 <= metrics['val_acc'] <= 1.0


def test_packed_batch_reaches_the_decoder():
    model = tiny(position='rope').eval()
    docs = [torch.randint(4, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 9)]
    x = torch.cat(docs)[None]
    batch = {'x': x, 'y': x, 'positions': torch.cat([torch.arange(7), torch.arange(9)])[None],
             'doc_ids': torch.tensor([[0] * 7 + [1] * 9])}
    with torch.no_grad():
        packed = model(batch['x'], **model._model_inputs(batch))
        assert (packed[:, 7:] - model(docs[1][None])).abs().max() <= 1e-5


def test_weight_decay_groups():
    model = tiny(position='learned')
    decay, no_decay = model.parameter_groups()
    names = {id(p): n for n, p in model.model.named_parameters()}
    decay_names = {names[id(p)] for p in decay['params']}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    assert no_decay['weight_decay'] == 0.0 and 'weight_decay' not in decay
    assert decay_names == {n for n, p in model.model.named_parameters() if p.dim() >= 2 and 'embedding' not in n}
    assert {'embedding.weight', 'position.embedding.weight', 'blocks.0.norm1.weight', 'head.bias'} <= no_decay_names
    assert len(decay['params']) + len(no_decay['params']) == len(list(model.parameters()))
    tied = tiny(tie_embeddings=True, weight_decay_embeddings=True)
    decay, no_decay = tied.parameter_groups()
    assert sum(p is tied.model.embedding.weight for p in decay['params']) == 1  # shared weight listed once
    assert all(p.dim() == 1 for p in no_decay['params'])
    optimizer = default_optimizer(model.parameter_groups())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g['weight_decay'] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]['lr'] == 3e-4


def test_warmup_cosine_shape():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        schedule.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # linear warmup, then the peak
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert all(a > b for a, b in zip(lrs[4:14], lrs[5:15]))  # strictly decreasing
    assert lrs[14:] == pytest.approx([0.1] * 6)  # floor
    with pytest.raises(ValueError, match='total_steps'):
        WarmupCosine(optimizer, warmup_steps=10, total_steps=5)


def rates(schedule_cls, steps, **kwargs):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = schedule_cls(optimizer, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        schedule.step()
    return lrs


@pytest.mark.parametrize('decay, half', [('linear', 0.5), ('cosine', 0.5), ('1-sqrt', 1 - 0.5 ** 0.5)])
def test_wsd_values_at_its_breakpoints(decay, half):
    # 4 warmup steps, total 24, decay over the last 25% = 6 steps (18..24), floor 0.1 of the peak 2.0
    lrs = rates(WSD, 30, warmup_steps=4, total_steps=24, decay_fraction=0.25, decay=decay, min_lr_ratio=0.1)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # linear warmup: (step + 1) / warmup
    assert lrs[4:19] == pytest.approx([2.0] * 15)  # stable to the first decay step, which is still the peak
    assert lrs[21] == pytest.approx(2.0 * (0.1 + 0.9 * half))  # half way through the decay
    assert all(a > b for a, b in zip(lrs[18:24], lrs[19:25]))  # strictly decreasing
    assert lrs[24:] == pytest.approx([0.2] * 6)  # the floor from total_steps on
    lrs = rates(WSD, 10, warmup_steps=6, total_steps=8, decay_fraction=0.5)  # decay never starts before warmup ends
    assert lrs[:7] == pytest.approx([2 / 6, 4 / 6, 1.0, 4 / 3, 5 / 3, 2.0, 2.0])
    assert lrs[7:] == pytest.approx([1.0, 0.0, 0.0])
    assert rates(WSD, 5, warmup_steps=2, total_steps=None)[1:] == pytest.approx([2.0] * 4)  # until filled in
    for kwargs, match in ((dict(decay='step'), "decay='step'"), (dict(decay_fraction=0.0), 'decay_fraction'),
                          (dict(min_lr_ratio=1.5), 'min_lr_ratio'), (dict(total_steps=2), 'total_steps')):
        with pytest.raises(ValueError, match=match):
            WSD(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **dict(warmup_steps=2) | kwargs)


def test_schedule_steps_per_batch_and_total_from_trainer(tmp_path):
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]['lr'])

    model = tiny(optimizer=partial(torch.optim.AdamW, lr=1e-2),
                 scheduler=partial(WarmupCosine, warmup_steps=2, min_lr_ratio=0.0))
    batches = list(char_batches(batch_size=4))[:3]  # 3 steps per epoch
    fit = trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[Record()])
    fit.fit(model, DataLoader(batches, batch_size=None))
    assert fit.lr_scheduler_configs[0].interval == 'step'
    assert fit.lr_scheduler_configs[0].scheduler.total_steps == 9  # from estimated_stepping_batches
    expected = [1e-2 * WarmupCosine.factor(fit.lr_scheduler_configs[0].scheduler, s) for s in range(9)]
    assert lrs == pytest.approx(expected)
    assert lrs[3] > lrs[4] > lrs[5]  # changes within an epoch (steps 3-5 are the second epoch)


@pytest.mark.parametrize('variant', [dict(), dict(position='rope', norm='rmsnorm', ffn='swiglu', n_kv_heads=2,
                                                  tie_embeddings=True, sliding_window=8)], ids=['default', 'modern'])
def test_checkpoint_round_trip(tmp_path, variant):
    model = tiny(**variant)
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=1, enable_checkpointing=True)
    fit.fit(model, char_batches(), char_batches())
    path = tmp_path / 'model.ckpt'
    fit.save_checkpoint(path)
    loaded = XLabModel.load_from_checkpoint(path).eval()
    model.eval()
    assert loaded.hparams == model.hparams
    assert {k: v for k, v in loaded.hparams.items() if k in variant} == variant
    x = next(iter(char_batches()))['x']
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert 'optimizer' not in loaded.hparams
    state = torch.load(path, weights_only=False)['state_dict']
    assert not any('cache' in k or k.endswith('inv_freq') for k in state)  # buffers stay out


def test_debug_logs_grad_norms_and_warns_on_nan(tmp_path):
    model = tiny(debug=True)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0, log_every_n_steps=1)
    fit.fit(model, char_batches())
    assert fit.callback_metrics['grad_2.0_norm_total'] > 0
    with torch.no_grad():
        model.model.head.bias.fill_(float('nan'))
    with pytest.warns(RuntimeWarning, match='non-finite training loss'):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, char_batches())


def test_predict_step():
    model = tiny().eval()
    batch = next(iter(char_batches(batch_size=2)))
    batch['y'][1, 10:] = PAD
    with torch.no_grad():
        out = model.predict_step(batch, 0)
        assert out['tokens'].tolist() == [32, 10]
        logits = model(batch['x'])
        assert out['loss'][1] == pytest.approx(F.cross_entropy(logits[1, :10], batch['y'][1, :10]).item(), rel=1e-5)
        assert torch.equal(model.predict_step({'x': batch['x']}, 0)['next'], logits.argmax(-1))


def test_forward_and_cache_pass_through():
    model = tiny(position='alibi', n_kv_heads=1).eval()
    x = torch.randint(4, 128, (2, 9))
    with torch.no_grad():
        cache = model.init_cache(2)
        assert cache.batch_size == 2 and cache.max_len == 32
        prefill = model(x[:, :8], cache=cache, input_pos=torch.arange(8))
        step = model(x[:, 8:], cache=cache, input_pos=torch.tensor([8]))
        assert (torch.cat([prefill, step], 1) - model(x)).abs().max() <= 1e-4


def test_default_optimizer_fused_on_cpu_but_not_with_clipping_under_mixed_precision(tmp_path):
    kinds = {}
    for precision in ('32-true', 'bf16-mixed'):
        model = tiny()
        fit = trainer(tmp_path, max_steps=1, limit_val_batches=0, precision=precision, gradient_clip_val=1.0)
        fit.fit(model, char_batches())  # Lightning refuses clipping with a fused optimizer under bf16-mixed
        kinds[precision] = fit.optimizers[0].defaults['fused']
    assert kinds == {'32-true': True, 'bf16-mixed': False}


def test_compile_option_keeps_checkpoint_names():
    model = tiny(compile=True)
    names = set(model.state_dict())
    model.configure_model()  # Lightning calls this before fitting; compilation itself happens on first call
    assert model.model._compiled_call_impl is not None
    assert set(model.state_dict()) == names and not any('_orig_mod' in n for n in names)


# ------------------------------------------------------------------------------- roles and parameter groups

ROLE_VARIANTS = {
    'default': dict(), 'learned': dict(position='learned'),
    'modern': dict(position='rope', norm='rmsnorm', ffn='swiglu', n_kv_heads=2, tie_embeddings=True, bias=False,
                   qk_norm=True),
    'postnorm-parallel': dict(prenorm=False, parallel_residual=True, final_norm=False),
}


@pytest.mark.parametrize('variant', ROLE_VARIANTS)
def test_parameter_roles_by_module(variant):
    model = tiny(**ROLE_VARIANTS[variant])
    roles = parameter_roles(model.model)
    assert list(roles) == [n for n, _ in model.model.named_parameters()]  # every parameter, a tied one once
    assert 'other' not in roles.values()
    for name, role in roles.items():
        leaf = name.rsplit('.', 2)
        expected = ('bias' if leaf[-1] == 'bias' else
                    'embedding' if name == 'embedding.weight' else
                    'position' if name.startswith('position.') else
                    'head' if name == 'head.weight' else
                    'matrix' if leaf[-2] in ('qkv', 'proj', 'fc') else
                    'norm')
        assert role == expected, name
    assert ('head.weight' in roles) == (not ROLE_VARIANTS[variant].get('tie_embeddings', False))


def test_parameter_roles_see_through_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from xlabml.layers import Block
    model = tiny(position='learned', tie_embeddings=True)
    plain = parameter_roles(model.model)
    wrapped = copy.deepcopy(model)
    apply_activation_checkpointing(wrapped.model, check_fn=lambda m: isinstance(m, Block))
    names = [n for n, _ in wrapped.model.named_parameters()]
    assert any('_checkpoint_wrapped_module' in n for n in names)
    assert parameter_roles(wrapped.model) == plain
    assert parameter_roles(torch.compile(model.model)) == plain  # '_orig_mod.' names
    assert unwrapped_name('model.blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.qkv.weight') == \
        'model.blocks.0.attn.qkv.weight'


def test_weight_decay_groups_do_not_depend_on_parameter_shapes():
    # FSDP hands configure_optimizers 1-D shards of every parameter: the groups must be the same
    model = tiny(position='learned')
    names = {id(p): n for n, p in model.model.named_parameters()}
    before = [[names[id(p)] for p in g['params']] for g in model.parameter_groups()]
    for p in model.parameters():
        p.data = p.data.flatten()
    after = [[names[id(p)] for p in g['params']] for g in model.parameter_groups()]
    assert after == before
    assert len(before[0]) == 2 * 4 + 1  # four matrices per block and the head


# ------------------------------------------------------------------------------------------ chunked loss

def plain_reference(hidden, weight, bias, targets, ignore=-100):
    logits = F.linear(hidden, weight, bias)
    valid = targets != ignore
    nll = F.cross_entropy(logits.float(), targets, ignore_index=ignore, reduction='sum')
    return nll, valid.sum(), ((logits.argmax(-1) == targets) & valid).sum()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 70), chunk=st.integers(1, 80), vocab=st.integers(2, 40), with_bias=st.booleans(),
       ignored=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
def test_linear_cross_entropy_equals_the_plain_loss(rows, chunk, vocab, with_bias, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = -100
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    nll, n, correct = linear_cross_entropy(hidden, weight, bias, targets, chunk_size=chunk)
    ref_nll, ref_n, ref_correct = plain_reference(hidden, weight, bias, targets)
    assert n == ref_n and correct == ref_correct
    torch.testing.assert_close(nll.double(), ref_nll.double(), rtol=1e-6, atol=1e-6)  # float32 sums
    grads = torch.autograd.grad(3.0 * nll, inputs)
    ref_grads = torch.autograd.grad(3.0 * ref_nll, inputs)
    for ours, theirs in zip(grads, ref_grads):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # both round the logits to float32


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 50), chunk=st.integers(1, 60), vocab=st.integers(2, 30), z_loss=st.sampled_from([0.0, 1e-2]),
       cap=st.sampled_from([None, 2.0, 30.0]), seed=st.integers(0, 2 ** 16))
def test_z_loss_and_softcap_equal_their_formulas_in_both_paths(rows, chunk, vocab, z_loss, cap, seed):
    """The chunked and plain objectives equal ``CE(cap tanh(l / cap)) + z_loss * sum logsumexp^2`` written out
    with autograd, values and gradients; the stats are its parts."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (2 * torch.randn(vocab, 8, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < 0.2] = -100
    valid = targets != -100
    raw = F.linear(hidden, weight, bias)
    logits = raw if cap is None else cap * torch.tanh(raw / cap)
    lse = torch.logsumexp(logits, -1)
    nll = F.cross_entropy(logits, targets, reduction='sum')
    reference = nll + z_loss * (lse.square() * valid).sum()
    chunked, n, _, stats = linear_cross_entropy(hidden, weight, bias, targets, chunk_size=chunk, z_loss=z_loss,
                                                softcap=cap, return_stats=True)
    plain, plain_stats = cross_entropy(softcap_logits(raw, cap), targets, z_loss=z_loss)
    assert n == valid.sum()
    for ours, parts in ((chunked, stats), (plain, plain_stats)):
        torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts['nll'].double(), nll.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts['lse_sq'].double(), (lse.square() * valid).sum().detach(), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(parts['logit_absmax'].double(), logits.detach().abs().max(), rtol=1e-5, atol=1e-6)
        if cap is not None:
            assert parts['logit_absmax'] <= cap
    inputs = (hidden, weight, bias)
    expected = torch.autograd.grad(reference, inputs, retain_graph=True)
    for grads in (torch.autograd.grad(chunked, inputs), torch.autograd.grad(plain, inputs)):
        for ours, theirs in zip(grads, expected):
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5)  # float32 logits


def test_training_objective_adds_the_z_loss_and_logs_the_cross_entropy():
    model = tiny(z_loss=1e-3, logit_softcap=5.0, loss_chunk_size=None).train()
    x = torch.randint(4, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {'x': x[:, :-1], 'y': x[:, 1:]}
    objective, n, _ = model.batch_loss(batch)
    parts = model.loss_parts
    assert objective.item() == pytest.approx((parts['ce'] + 1e-3 * parts['zloss']).item(), rel=1e-6)
    assert parts['zloss'] > 0 and parts['logit_absmax'] < 5.0
    chunked = tiny(z_loss=1e-3, logit_softcap=5.0, loss_chunk_size=7).train()
    assert chunked.batch_loss(batch)[0].item() == pytest.approx(objective.item(), rel=1e-5)
    model.eval()
    assert model.batch_loss(batch)[0].item() == pytest.approx(parts['ce'].item(), rel=1e-5)  # eval: CE alone
    with pytest.raises(ValueError, match='z_loss must be a number >= 0'):
        tiny(z_loss=-1.0)
    with pytest.raises(ValueError, match='logit_softcap'):
        tiny(logit_softcap=0)


def test_linear_cross_entropy_under_autocast_is_as_close_as_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g, requires_grad=True)
    weight = (0.2 * torch.randn(500, 32, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(500, generator=g)).requires_grad_()
    targets = torch.randint(0, 500, (300,), generator=g)
    exact = plain_reference(hidden.double(), weight.double(), bias.double(), targets)[0]
    exact_grads = torch.autograd.grad(exact, (hidden, weight, bias))
    results = {}
    for name, fn in (('plain', plain_reference), ('chunked', partial(linear_cross_entropy, chunk_size=64))):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            nll, _, correct = fn(hidden, weight, bias, targets)
        grads = torch.autograd.grad(nll, (hidden, weight, bias))
        results[name] = nll, correct, grads
    assert results['chunked'][1] == results['plain'][1]  # argmax of the same bf16 logits
    for name, (nll, _, grads) in results.items():
        assert grads[0].dtype == grads[1].dtype == torch.float32
        assert abs(nll.item() - exact.item()) / exact.item() < 2e-3  # bf16 logits
        for ours, truth in zip(grads, exact_grads):
            assert ((ours - truth).norm() / truth.norm()).item() < 1e-2, name


@pytest.mark.parametrize('variant', [dict(), dict(tie_embeddings=True, bias=False), dict(tie_embeddings=True)],
                         ids=['bias', 'tied', 'tied-bias'])
def test_chunked_training_step_equals_the_plain_one(variant):
    batch = next(iter(char_batches(batch_size=3)))
    batch['y'][1, 20:] = PAD
    losses, grads = {}, {}
    for chunk in (None, 7):  # 7 rows: chunks straddle the rows of the batch
        model = tiny(loss_chunk_size=chunk, **variant)
        loss, n, correct = model.batch_loss(batch)
        loss.backward()
        losses[chunk] = loss.item(), int(n), int(correct)
        grads[chunk] = {name: p.grad for name, p in model.named_parameters()}
    assert losses[7][1:] == losses[None][1:] == (losses[None][1], losses[None][2])
    assert losses[7][0] == pytest.approx(losses[None][0], rel=1e-6)
    assert grads[7].keys() == grads[None].keys()
    for name in grads[None]:
        torch.testing.assert_close(grads[7][name], grads[None][name], rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_computes_only_the_gradients_asked_for(monkeypatch):
    """A frozen head (LoRA) costs no weight gradient: the v x c product per chunk is skipped, and the hidden
    states' gradient is the plain loss's."""
    import xlabml.losses as losses

    calls = []
    real = losses._add_matmul
    monkeypatch.setattr(losses, '_add_matmul', lambda *args: calls.append(1) or real(*args))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(20, 8, generator=g, dtype=torch.float64), torch.randn(20, generator=g)
    targets = torch.randint(0, 20, (30,), generator=g)
    nll, _, _ = linear_cross_entropy(hidden, weight, bias.double(), targets, chunk_size=7)
    (grad,) = torch.autograd.grad(nll, [hidden])
    assert calls == []
    (ref,) = torch.autograd.grad(plain_reference(hidden, weight, bias.double(), targets)[0], [hidden])
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)
    weight.requires_grad_(True)
    torch.autograd.grad(linear_cross_entropy(hidden, weight, None, targets, chunk_size=7)[0], [hidden, weight])
    assert len(calls) == 5  # one per chunk of 7 rows of 30


def test_chunked_loss_keeps_no_batch_sized_logits_for_backward():
    n_vocab, rows = 128, 4 * 32
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    for chunk in (None, 16, 'default'):
        model = tiny() if chunk == 'default' else tiny(loss_chunk_size=chunk)
        batch = next(iter(char_batches(batch_size=4)))
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model._step(batch, 'train')  # the training step's loss, as Lightning calls it
        loss.backward()
        largest = max(saved)
        if chunk is None:
            assert largest >= rows * n_vocab  # the plain loss keeps its log-softmax for backward
        else:
            assert largest < rows * n_vocab  # nothing of the size of the batch's logits (d_ff 64 < n_vocab)


def test_loss_chunk_size_is_validated_and_backward_runs_once():
    with pytest.raises(ValueError, match='loss_chunk_size'):
        tiny(loss_chunk_size=0)
    with pytest.raises(ValueError, match='chunk_size'):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), None, torch.zeros(2, dtype=torch.long),
                             chunk_size=0)
    hidden = torch.randn(5, 4, requires_grad=True)
    nll, _, _ = linear_cross_entropy(hidden, torch.randn(3, 4), None, torch.tensor([0, 1, 2, 0, 1]), chunk_size=2)
    nll.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='once'):  # its gradients were scaled in place
        nll.backward()


# ----------------------------------------------------------------------------------- schedule on resume

class LRLog(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]['lr'])


def test_resume_with_more_steps_stretches_the_whole_run_schedule(tmp_path):
    import warnings
    from lightning.pytorch.callbacks import ModelCheckpoint
    schedule = partial(WarmupCosine, warmup_steps=2, total_steps=None, min_lr_ratio=0.1)
    batches = char_batches(batch_size=2)  # 5 batches an epoch
    make = lambda: tiny(optimizer=partial(torch.optim.AdamW, lr=1e-2), scheduler=schedule)
    expected = [1e-2 * WarmupCosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 2, 12,
                                    0.1).factor(s) for s in range(12)]
    straight = LRLog()
    every_3 = ModelCheckpoint(dirpath=tmp_path / 'straight', every_n_train_steps=3, save_top_k=-1,
                              filename='{step}')
    trainer(tmp_path, max_steps=12, limit_val_batches=0, callbacks=[straight, every_3],
            enable_checkpointing=True).fit(make(), batches)
    assert straight.lrs == pytest.approx(expected)

    six = LRLog()
    fit = trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[six])
    fit.fit(make(), batches)
    fit.save_checkpoint(tmp_path / 'six.ckpt')
    assert six.lrs[-1] < six.lrs[2]  # a 6-step cosine: decaying
    resumed = LRLog()
    with pytest.warns(UserWarning, match='schedule over 6 steps; it now follows this run.s 12 steps'):
        fit = trainer(tmp_path, max_steps=12, limit_val_batches=0, callbacks=[resumed])
        fit.fit(make(), batches, ckpt_path=tmp_path / 'six.ckpt')
    assert fit.lr_scheduler_configs[0].scheduler.total_steps == 12
    assert resumed.lrs == pytest.approx(expected[6:])  # not the 6-step run's floor of 1e-3

    # the same horizon: the rates continue exactly, without a warning
    again = LRLog()
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='WarmupCosine')
        trainer(tmp_path, max_steps=12, limit_val_batches=0, callbacks=[again]).fit(
            make(), batches, ckpt_path=tmp_path / 'straight' / 'step=3.ckpt')
    assert again.lrs == straight.lrs[3:]


def test_validation_logs_bits_per_byte_of_the_decoded_targets(tmp_path):
    """val_bpb = summed NLL / ln 2 / bytes, where the bytes are those of the validation documents' text: every
    target is scored once (windows of stride seq_len), and <eos> decodes to nothing."""
    from xlabml.datamodules import XLabDataModule
    from xlabml.tokenizer import TokenizerTrainer
    words = "the quick brown fox jumps over a lazy dog while python code runs in loops é ü".split()
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + (i * 5) % 30)) for i in range(60)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n")
    tok = tmp_path / "tok.model"
    TokenizerTrainer().train(docs, 300, tok)
    dm = XLabDataModule(locations=str(corpus), splits={"train": 0.8, "val": 0.2}, num_tokens=300,
                        tokenizer_path=str(tok), seq_len=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("validate")
    model = tiny(n_vocab=300, max_len=16).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            keep = batch['y'] != PAD
            nll += F.cross_entropy(model(batch['x'])[keep], batch['y'][keep], reduction='sum').item()
            count += int(keep.sum())
    n_bytes = sum(len(text.encode("utf-8")) for text in dm.texts()["val"]["text"])
    metrics = trainer(tmp_path).validate(model, datamodule=dm, verbose=False)[0]
    assert metrics['val_loss'] == pytest.approx(nll / count, rel=1e-5)
    assert metrics['val_bpb'] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    # the byte count is not the token count: a bits-per-token figure would differ
    assert abs(metrics['val_bpb'] - metrics['val_bpt']) > 0.1
