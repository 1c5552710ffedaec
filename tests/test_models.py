import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from xlabml.models import XLabModel, default_optimizer
from xlabml.roles import parameter_roles, unwrapped_name
from xlabml.schedules import WarmupCosine

PAD = 3
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.")


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds barrier waits on a busy machine
    yield
    torch.set_num_threads(threads)


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
