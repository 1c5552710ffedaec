"""The GPU paths on a small model: bf16-mixed training and exact resume, the flash-attn backend against SDPA,
compiled decoding with CUDA graphs against eager, FSDP through the real overlay and CLI, the chunked loss.

Every test is marked ``gpu`` and skips without a CUDA device; a test that needs an optional package (flash_attn,
or the CLI's jsonargparse/datasets/torchdata) skips naming it. Run them with

    python -m pytest -m gpu tests/test_gpu.py -v
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# deterministic cuBLAS for the exact-resume test; must be set before the first CUDA call
os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device('cuda')


def tiny(**kwargs):
    from xlabml.models import XLabModel
    torch.manual_seed(0)
    config = dict(n_vocab=256, max_len=64, d_model=64, n_layers=2, n_heads=4, d_ff=128, dropout=0.0) | kwargs
    return XLabModel(**config)


def random_batches(n, rows=8, seq=64, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(4, vocab, (n, rows, seq + 1), generator=g)
    return [{'x': d[:, :-1], 'y': d[:, 1:]} for d in data]


def missing(*modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.fixture(autouse=True)
def restore_determinism():
    # Trainer(deterministic=...) switches torch's global flag and leaves it switched
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ----------------------------------------------------------------------------------- bf16-mixed training

def test_bf16_mixed_fit_and_exact_resume(tmp_path):
    from functools import partial

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from xlabml.schedules import WarmupCosine

    batches = random_batches(3)  # 3 steps an epoch: the checkpoint at step 3 is at an epoch's end
    make = lambda: tiny(scheduler=partial(WarmupCosine, warmup_steps=2, total_steps=6))

    def trainer(max_steps, **kwargs):
        return L.Trainer(accelerator='gpu', devices=1, precision='bf16-mixed', max_steps=max_steps,
                         gradient_clip_val=1.0, deterministic='warn', logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, **kwargs)

    loader = lambda: DataLoader(batches, batch_size=None)
    # the checkpoint is written inside the loop (as the CLI's ModelCheckpoint callbacks do)
    every_3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename='{step}')
    straight = make()
    fit = trainer(6, callbacks=[every_3])
    fit.fit(straight, loader())
    assert fit.global_step == 6 and torch.isfinite(fit.callback_metrics['train_loss'])
    resumed = make()
    rest = trainer(6, enable_checkpointing=False)
    rest.fit(resumed, loader(), ckpt_path=tmp_path / 'step=3.ckpt')
    assert rest.global_step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit for bit the uninterrupted run
    state_a, state_b = fit.optimizers[0].state_dict()['state'], rest.optimizers[0].state_dict()['state']
    assert all(torch.equal(state_a[k]['exp_avg_sq'], state_b[k]['exp_avg_sq']) for k in state_a)


# --------------------------------------------------------------------------------------- attention kernels

@pytest.mark.skipif(bool(missing('flash_attn')), reason='needs the flash_attn package (xlabml[flash])')
@pytest.mark.parametrize('variant', [dict(), dict(sliding_window=16), dict(position='alibi'),
                                     dict(n_kv_heads=2, position='rope')], ids=['causal', 'window', 'alibi', 'gqa'])
def test_flash_attn_backend_matches_sdpa(variant):
    sdpa = tiny(**variant).to(CUDA, torch.bfloat16)
    flash = tiny(attention='flash', **variant).to(CUDA, torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict())
    x = torch.randint(4, 256, (2, 64), device=CUDA)
    doc_ids = torch.tensor([[0] * 20 + [1] * 44, [0] * 64], device=CUDA)
    for kwargs in (dict(), dict(doc_ids=doc_ids)):
        a, b = sdpa(x, **kwargs).float(), flash(x, **kwargs).float()
        assert ((a - b).norm() / a.norm()).item() < 2e-2, kwargs  # bf16 rounding between two kernels
        grads = []
        for model, logits in ((sdpa, a), (flash, b)):
            model.zero_grad()
            logits.square().mean().backward()
            grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
        assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 5e-2


# ---------------------------------------------------------------------------------------- compiled decode

@pytest.mark.parametrize('position', ['rope', 'alibi'])
def test_compiled_decode_with_cuda_graphs_equals_eager(position):
    from xlabml import inference
    model = tiny(position=position, n_kv_heads=2).to(CUDA).eval()
    prompts = [torch.randint(4, 256, (n,), device=CUDA) for n in (5, 11)]
    eager = inference.greedy_search(model, prompts, 40, block_size=64)
    compiled = inference.greedy_search(model, prompts, 40, block_size=64, compile=True)  # reduce-overhead
    again = inference.greedy_search(model, prompts, 40, block_size=64, compile=True)  # replays the graphs
    for e, c, a in zip(eager, compiled, again):
        assert e.tolist() == c.tolist() == a.tolist()
        assert len(e) == 40


# ------------------------------------------------------------------------------------------- chunked loss

@pytest.mark.parametrize('dtype', ['fp32', 'bf16-autocast'])
def test_chunked_loss_matches_the_plain_one_on_gpu(dtype):
    from xlabml.losses import linear_cross_entropy
    g = torch.Generator(device=CUDA).manual_seed(0)
    rows, d, v = 4096, 256, 8192
    hidden = torch.randn(rows, d, device=CUDA, generator=g, requires_grad=True)
    weight = (0.05 * torch.randn(v, d, device=CUDA, generator=g)).requires_grad_()
    bias = torch.zeros(v, device=CUDA, requires_grad=True)
    targets = torch.randint(0, v, (rows,), device=CUDA, generator=g)
    targets[::7] = -100
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=dtype != 'fp32')
    results = []
    for chunked in (False, True):
        with autocast:
            if chunked:
                nll, n, correct = linear_cross_entropy(hidden, weight, bias, targets, chunk_size=1000)
            else:
                logits = F.linear(hidden, weight, bias)
                nll = F.cross_entropy(logits.float(), targets, reduction='sum')
                correct = ((logits.argmax(-1) == targets) & (targets != -100)).sum()
        grads = torch.autograd.grad(nll / 1000, (hidden, weight, bias))
        results.append((nll.item(), int(correct), grads))
    (plain, plain_correct, plain_grads), (ours, our_correct, our_grads) = results
    assert our_correct == plain_correct
    tolerance = 1e-5 if dtype == 'fp32' else 2e-3
    assert abs(ours - plain) / plain < tolerance
    for a, b in zip(our_grads, plain_grads):
        assert ((a - b).norm() / b.norm()).item() < (1e-4 if dtype == 'fp32' else 1e-2)


def test_chunked_loss_peak_memory_is_a_fraction_of_the_plain_one():
    from xlabml.losses import linear_cross_entropy
    rows, d, v = 16384, 512, 32768  # a quarter of a release batch of 128 x 512
    hidden = torch.randn(rows, d, device=CUDA, requires_grad=True)
    weight = (0.02 * torch.randn(v, d, device=CUDA)).requires_grad_()
    targets = torch.randint(0, v, (rows,), device=CUDA)
    peaks, losses = {}, {}
    for chunked in (False, True):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            if chunked:
                nll, n, _ = linear_cross_entropy(hidden, weight, None, targets, chunk_size=2048, accuracy=False)
                loss = nll / n
            else:
                loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss.backward()
        torch.cuda.synchronize()
        peaks[chunked] = torch.cuda.max_memory_allocated() - start
        losses[chunked] = loss.item()
    assert peaks[True] <= 0.25 * peaks[False], peaks
    assert abs(losses[True] - losses[False]) / losses[False] < 1e-3


# --------------------------------------------------------------------------------------- FSDP via the CLI

@pytest.mark.slow
@pytest.mark.skipif(bool(missing('jsonargparse', 'datasets', 'torchdata')),
                    reason=f"the CLI needs {', '.join(missing('jsonargparse', 'datasets', 'torchdata'))}")
def test_fsdp_overlay_fits_checkpoints_and_loads_through_the_cli(tmp_path):
    import yaml

    from xlabml.models import XLabModel
    config = {
        'trainer': {'max_steps': 6, 'val_check_interval': 3, 'limit_val_batches': 2, 'num_sanity_val_steps': 0,
                    'log_every_n_steps': 1, 'enable_progress_bar': False, 'enable_model_summary': False,
                    'gradient_clip_val': 0.5, 'devices': 1},
        'data': {'locations': {'builtin': 'python-topics'}, 'num_tokens': 512, 'seq_len': 64, 'batch_size': 8,
                 'tokenizer_path': str(tmp_path / 'tokenizer.model'), 'num_proc': 1, 'num_workers': 0,
                 'cache_dir': str(tmp_path / 'cache')},
        'model': {'d_model': 64, 'n_layers': 2, 'n_heads': 4, 'd_ff': 128, 'dropout': 0.1},
    }
    (tmp_path / 'tiny.yaml').write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    run = lambda *args: subprocess.run([sys.executable, str(REPO / 'xlab.py'), *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=600)
    done = run('train_tokenizer', '-c', str(tmp_path / 'tiny.yaml'))
    assert done.returncode == 0, done.stderr[-2000:]
    done = run('fit', '-c', str(REPO / 'conf' / 'extra' / 'fsdp.yaml'), '-c', str(tmp_path / 'tiny.yaml'))
    assert done.returncode == 0, done.stderr[-3000:]  # clipping by norm under FSDP no longer crashes
    last = next(tmp_path.glob('logs/**/last.ckpt'))
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint['global_step'] == 6
    model = XLabModel.load_from_checkpoint(last, map_location='cuda').eval()
    assert set(checkpoint['state_dict']) == set(model.state_dict())  # one consolidated file, plain names
    decay = checkpoint['optimizer_states'][0]['param_groups'][0]
    assert decay['weight_decay'] > 0 and len(decay['params']) == 2 * 4 + 1  # the matrices, by role
    x = torch.randint(4, 512, (2, 64), device=CUDA)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 64, 512) and torch.isfinite(logits).all()
