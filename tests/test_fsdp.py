"""The FSDP path on CPU: two processes on gloo, Lightning's own FSDP strategy and training loop.

Lightning's ``FSDPStrategy`` refuses ``accelerator='cpu'`` only for the class itself, and torch's FSDP1 runs on
CPU when given ``device_id=torch.device('cpu')`` (Lightning passes None there): ``CPUFSDPStrategy`` below
changes just that, so ``Trainer.fit`` runs the real sharding, activation checkpointing wrappers, parameter
groups, gradient clipping hook and consolidated checkpoint of ``conf/extra/fsdp.yaml``.

Lightning starts the second rank by re-executing the command, so the distributed part runs in a subprocess:
``python tests/test_fsdp.py worker OUT_DIR`` (this file), which writes what each rank saw to OUT_DIR; the test
compares that with a one-process run of the same model on the same batches.
"""
import copy
import importlib
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler

from xlabml.layers import POSITIONS, Block, Decoder
from xlabml.models import XLabModel
from xlabml.roles import parameter_roles, unwrapped_name

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(n_vocab=128, max_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
              loss_chunk_size=24)  # 24-row chunks: the chunked loss runs several chunks per batch
ROWS, BATCH, STEPS, CLIP = 16, 2, 3, 0.1  # per-rank batch 2 (2 ranks) vs batch 4 in one process


def rows():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(4, 128, (ROWS, 33), generator=g)
    return [{'x': r[:-1], 'y': r[1:]} for r in data]


def grad_norm(module):
    """The 2-norm of all gradients; under FSDP each rank holds a disjoint shard, so the squares are summed over
    ranks."""
    squares = sum(p.grad.float().square().sum() for p in module.parameters() if p.grad is not None)
    squares = torch.as_tensor(squares, dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(squares)
    return math.sqrt(squares.item())


def equal(a, b):
    """Bitwise equality of two position outputs: None, a tensor or a tuple of tensors."""
    if a is None or b is None:
        return a is None and b is None
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(a, b))


class Recorder(XLabModel):
    """XLabModel that records each step's loss and the gradient norm before and after its clipping hook."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.record = {'loss': [], 'norm_before': [], 'norm_after': []}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.record['loss'].append(loss.item())
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.record['norm_before'].append(grad_norm(self))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.record['norm_after'].append(grad_norm(self))


def muon():
    from xlabml.optim import MuonAdamW
    # float32 Newton-Schulz: the sharded and the one-process runs then agree to float rounding (bf16 would round
    # their tiny gradient differences apart); split_fused: attention's qkv is orthogonalised as three matrices
    # (rebuilt whole from the shards, split by rows), the output projections as one
    return partial(MuonAdamW, lr=0.02, adam_lr=1e-3, ns_dtype='float32', split_fused=True)


def make_model(optimizer=None):
    torch.manual_seed(0)
    return Recorder(**CONFIG, **({'optimizer': optimizer} if optimizer else {}))


def trainer_kwargs(tmp):
    return dict(accelerator='cpu', max_steps=STEPS, gradient_clip_val=CLIP, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                default_root_dir=tmp)


# ------------------------------------------------------------------------------------------------ the ranks

def worker(out_dir):
    import lightning.pytorch.strategies.fsdp as lightning_fsdp
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model):  # Lightning's, with device_id=cpu instead of None
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device('cpu'), **self.kwargs)
            _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
            return model

    def full_state_dict_context(module, world_size, rank0_only=True):
        # Lightning's, without offload_to_cpu: on CPU that "offload" returns the unsharded tensor itself, which
        # FSDP frees before the copy is taken (a segmentation fault); on GPU it is a real copy
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        return FullyShardedDataParallel.state_dict_type(
            module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))

    lightning_fsdp._get_full_state_dict_context = full_state_dict_context
    torch.set_num_threads(1)
    out = Path(out_dir)
    # the overlay's sharding, wrapping and checkpoint settings; its bf16 precision is left out (the comparison
    # with one process is exact only in fp32), the positions under bf16 are checked below
    settings = yaml.safe_load((ROOT / 'conf/extra/fsdp.yaml').read_text())['trainer']['strategy']['init_args']
    classes = lambda names: {getattr(importlib.import_module(n.rsplit('.', 1)[0]), n.rsplit('.', 1)[1])
                             for n in names}
    strategy = CPUFSDPStrategy(sharding_strategy=settings['sharding_strategy'],
                               state_dict_type=settings['state_dict_type'],
                               auto_wrap_policy=classes(settings['auto_wrap_policy']),
                               activation_checkpointing_policy=classes(settings['activation_checkpointing_policy']))
    with_muon = os.environ.get('XLAB_TEST_OPTIMIZER') == 'muon'
    model = make_model(muon() if with_muon else None)
    trainer = L.Trainer(devices=2, strategy=strategy, precision='32-true', use_distributed_sampler=False,
                        **trainer_kwargs(out))
    # rank r takes rows r, r + 2, ...: together the ranks' batches are the one-process batches (Lightning's own
    # distributed sampler would shuffle them)
    rank = int(os.environ.get('LOCAL_RANK', 0))  # set by Lightning's launcher for the re-executed rank
    sampler = DistributedSampler(rows(), num_replicas=2, rank=rank, shuffle=False)
    trainer.fit(model, DataLoader(rows(), batch_size=BATCH, sampler=sampler))
    assert trainer.global_rank == rank

    names = {id(p): unwrapped_name(n) for n, p in model.model.named_parameters()}
    groups = [sorted(names[id(p)] for p in g['params']) for g in trainer.optimizers[0].param_groups]
    wrapped = [n for n, _ in model.model.named_parameters()]
    x = torch.stack([r['x'] for r in rows()[:4]])
    model.eval()
    with torch.no_grad():
        logits = trainer.model(x)  # the FSDP root's forward: every rank takes part
    if with_muon:  # the optimizer is what differs: its losses and logits are what to compare
        (out / f'rank{rank}.json').write_text(json.dumps({'record': model.record, 'muon_shards': len(
            trainer.optimizers[0]._shards)}))
        if rank == 0:
            torch.save(logits, out / 'logits.pt')
        return
    trainer.save_checkpoint(out / 'fsdp.ckpt')  # state_dict_type full: one consolidated file, from rank 0

    # positions under FSDP bf16 mixed precision with buffers cast to bf16 (Lightning's bf16-mixed default)
    positions = {}
    bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    for kind in POSITIONS:
        torch.manual_seed(1)
        # 12 heads: ALiBi slopes that bf16 cannot represent exactly (4 or 8 heads have powers of two)
        plain = Decoder(128, 512, d_model=48, n_layers=1, n_heads=12, d_ff=64, dropout=0.0, position=kind)
        sharded = FullyShardedDataParallel(copy.deepcopy(plain), mixed_precision=bf16, device_id=torch.device('cpu'),
                                           auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True)
        tokens = torch.randint(0, 128, (1, 512), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            full, half = plain(tokens), sharded(tokens).float()
        p = torch.arange(512)[None]
        ours, theirs = plain.position, sharded.module.position
        same = None  # a learned table is a parameter, which FSDP shards and casts to bf16 for compute, as it should
        if not list(ours.parameters()):
            with torch.no_grad():
                same = (equal(ours.embed(p), theirs.embed(p)) and equal(ours.rotary(p), theirs.rotary(p))
                        and equal(ours.bias(p[0], p[0]), theirs.bias(p[0], p[0])))
        positions[kind] = {'same_as_fp32': same,
                           'logits_rel_err': ((half - full).norm() / full.norm()).item()}

    (out / f'rank{rank}.json').write_text(json.dumps({
        'record': model.record, 'groups': groups, 'wrapped_names': wrapped,
        'roles': parameter_roles(model.model), 'positions': positions,
        'world_size': trainer.world_size, 'strategy': type(trainer.strategy).__name__,
    }))
    if rank == 0:
        torch.save(logits, out / 'logits.pt')


# ------------------------------------------------------------------------------------------------- the test

def run_ranks(out, **env_vars):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LOCAL_RANK', 'NODE_RANK', 'WORLD_SIZE'))}
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    env.update(env_vars)
    result = subprocess.run([sys.executable, __file__, 'worker', str(out)], cwd=out, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f'rank{r}.json').read_text()) for r in range(2)]


@pytest.fixture(scope='module')
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('fsdp')
    return out, run_ranks(out)


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    torch.set_num_threads(1)
    model = make_model()
    trainer = L.Trainer(devices=1, **trainer_kwargs(tmp_path_factory.mktemp('single')))
    trainer.fit(model, DataLoader(rows(), batch_size=2 * BATCH))
    return model


@pytest.mark.slow
def test_fsdp_groups_are_chosen_by_role(fsdp_run):
    _, ranks = fsdp_run
    plain = make_model()
    roles = parameter_roles(plain.model)
    matrices = sorted(n for n, r in roles.items() if r in ('matrix', 'head'))
    assert len(matrices) == 2 * 4 + 1  # qkv, attention proj, fc, ffn proj per block, and the head
    for rank in ranks:
        assert rank['world_size'] == 2 and rank['strategy'] == 'CPUFSDPStrategy'
        assert any('_fsdp_wrapped_module' in n and '_checkpoint_wrapped_module' in n for n in rank['wrapped_names'])
        assert rank['roles'] == roles  # the wrapped names map to the same roles
        decay, no_decay = rank['groups']
        assert decay == matrices  # every matrix decays, although FSDP flattened them to 1-D shards
        assert sorted(decay + no_decay) == sorted(roles)


@pytest.mark.slow
def test_fsdp_clips_by_the_norm_over_all_shards(fsdp_run, one_process):
    _, ranks = fsdp_run
    record = ranks[0]['record']
    assert ranks[1]['record']['norm_before'] == pytest.approx(record['norm_before'])  # a global figure
    assert len(record['norm_after']) == STEPS
    assert all(before > CLIP for before in record['norm_before'])  # so clipping had something to do
    assert all(after <= CLIP * (1 + 1e-5) for after in record['norm_after'])
    assert record['norm_after'] == pytest.approx([CLIP] * STEPS, rel=1e-5)
    # the unclipped norm is that of the same gradients in one process
    assert record['norm_before'] == pytest.approx(one_process.record['norm_before'], rel=1e-4)


@pytest.mark.slow
def test_fsdp_losses_match_one_process(fsdp_run, one_process):
    _, ranks = fsdp_run
    # each rank's loss is the mean over its half of the batch (equal token counts): their mean is the batch's
    fsdp = [(a + b) / 2 for a, b in zip(ranks[0]['record']['loss'], ranks[1]['record']['loss'])]
    assert len(fsdp) == STEPS
    assert fsdp == pytest.approx(one_process.record['loss'], rel=1e-5)


@pytest.mark.slow
def test_fsdp_consolidated_checkpoint_loads_into_a_plain_model(fsdp_run, one_process):
    out, _ = fsdp_run
    state = torch.load(out / 'fsdp.ckpt', weights_only=False)['state_dict']
    assert set(state) == set(XLabModel(**CONFIG).state_dict())  # plain names: no wrapper in the keys
    loaded = XLabModel.load_from_checkpoint(out / 'fsdp.ckpt').eval()
    x = torch.stack([r['x'] for r in rows()[:4]])
    with torch.no_grad():
        logits = loaded(x)
        reference = one_process.eval()(x)
    torch.testing.assert_close(logits, torch.load(out / 'logits.pt'), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)  # the same training, in one process


@pytest.mark.slow
@pytest.mark.parametrize('kind', list(POSITIONS))
def test_fsdp_bf16_positions_stay_fp32(fsdp_run, kind):
    _, ranks = fsdp_run
    for rank in ranks:
        result = rank['positions'][kind]
        # computed embeddings, angles and biases bit for bit those of the fp32 model
        assert result['same_as_fp32'] is (None if kind == 'learned' else True)
        assert result['logits_rel_err'] < 0.05  # the rest differs by bf16 rounding only


@pytest.mark.slow
def test_fsdp_muon_orthogonalises_whole_matrices_as_one_process(tmp_path):
    """MuonAdamW under FSDP (each matrix flattened and split over 2 ranks) trains exactly as in one process:
    the same losses and final logits, which needs each rank to orthogonalise the whole matrix."""
    out = tmp_path / 'fsdp'
    out.mkdir()
    ranks = run_ranks(out, XLAB_TEST_OPTIMIZER='muon')
    assert ranks[0]['muon_shards'] > 0  # attach_fsdp found the shards' layout
    torch.set_num_threads(1)
    model = make_model(muon())
    L.Trainer(devices=1, **trainer_kwargs(tmp_path / 'single')).fit(model, DataLoader(rows(), batch_size=2 * BATCH))
    fsdp = [(a + b) / 2 for a, b in zip(ranks[0]['record']['loss'], ranks[1]['record']['loss'])]
    assert fsdp == pytest.approx(model.record['loss'], rel=1e-5)
    x = torch.stack([r['x'] for r in rows()[:4]])
    with torch.no_grad():
        reference = model.eval()(x)
    torch.testing.assert_close(torch.load(out / 'logits.pt'), reference, atol=1e-4, rtol=1e-4)


if __name__ == '__main__' and sys.argv[1:2] == ['worker']:
    import warnings
    warnings.filterwarnings('ignore')
    worker(sys.argv[2])
