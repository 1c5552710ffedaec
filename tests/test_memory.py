"""Transformer-XL segment recurrence: the memory against one long window, its gradient with KV recompute, the
segments the data side emits, and training/validation/resume through Lightning."""
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xlabml.datamodules import XLabDataModule
from xlabml.datasets import TokenDataset
from xlabml.layers import Decoder
from xlabml.memory import SegmentMemory
from xlabml.models import XLabModel
from xlabml.segments import PAD_DOC, SegmentDataset
from xlabml.tokenizer import TokenizerTrainer

V = 37


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, position='rope') | kwargs
    model = Decoder(V, 16, **config)
    with torch.no_grad():  # sharper than at initialisation: what a token sees shows in its logits
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
        model.head.weight.mul_(10.0)
    return model


def tokens(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def nll(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------------------------- the memory

@pytest.mark.parametrize('position', ['rope', 'alibi', 'none'])
@pytest.mark.parametrize('n_layers,memory_len,first', [(1, 5, 8), (1, 12, 7), (2, 8, 8)], ids=str)
def test_segment_loss_equals_the_long_window_loss(position, n_layers, memory_len, first):
    # one layer: the memory's keys come from the embeddings alone, so any memory length is one long window; two
    # layers: a first segment (empty memory) as long as the memory is the long window's first part
    model = make(position=position, n_layers=n_layers, memory_len=memory_len, n_kv_heads=2).eval()
    x = tokens(3, first + 9)
    memory = SegmentMemory()
    model(x[:, :first], memory=memory)
    second = model(x[:, first:-1], memory=memory)
    start = max(0, first - memory_len)
    window = model(x[:, start:-1])[:, first - start:]
    torch.testing.assert_close(second, window, atol=2e-6, rtol=0)
    torch.testing.assert_close(nll(second, x[:, first + 1:]), nll(window, x[:, first + 1:]), atol=1e-6, rtol=0)
    # the memory did something: without it the segment's logits differ
    assert (model(x[:, first:-1]) - second).abs().max() > 1e-2


def test_memory_hides_other_documents_and_restarted_rows():
    model = make(memory_len=8).eval()
    x = tokens(2, 16)
    memory = SegmentMemory()
    model(x[:, :8], doc_ids=torch.zeros(2, 8, dtype=torch.long), memory=memory)
    # row 0 starts document 1 at its 3rd token; row 1's stream restarts (reset)
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0] * 8])
    out = model(x[:, 8:], doc_ids=doc_ids, memory=memory.segment(torch.tensor([False, True])))
    torch.testing.assert_close(out[0, 2:], model(x[:1, 10:])[0], atol=2e-6, rtol=0)  # document 1 alone
    torch.testing.assert_close(out[0, :2], model(x[:1, :10])[0, 8:], atol=2e-6, rtol=0)  # still sees document 0
    torch.testing.assert_close(out[1], model(x[1:, 8:])[0], atol=2e-6, rtol=0)  # as if nothing came before


def test_recompute_gives_the_long_window_gradient():
    x = tokens(2, 17)
    grads = {}
    for mode in ('none', 'recompute', 'window'):
        model = make(memory_len=8, memory_grad='recompute' if mode == 'recompute' else 'none').train()
        memory = SegmentMemory(recompute=mode == 'recompute')
        if mode == 'window':  # the reference: one window, the loss over its second half only
            loss = nll(model(x[:, :-1])[:, 8:], x[:, 9:])
        else:
            model(x[:, :8], memory=memory)  # step 1 (its gradient is not kept)
            loss = nll(model(x[:, 8:-1], memory=memory), x[:, 9:])
        model.zero_grad()
        loss.backward()
        grads[mode] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads['none'][0], grads['window'][0], atol=1e-6, rtol=0)  # same loss ...
    torch.testing.assert_close(grads['recompute'][0], grads['window'][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads['recompute'][1], grads['window'][1], atol=1e-6, rtol=0)  # ... its gradient
    assert (grads['none'][1] - grads['window'][1]).abs().max() > 1e-4  # the detached memory's gradient is not


def test_memory_needs_relative_positions():
    for position in ('sinusoidal', 'learned'):
        with pytest.raises(ValueError, match=f"memory_len=4 needs relative positions.*{position}"):
            make(position=position, memory_len=4)
    with pytest.raises(ValueError, match="memory_grad='all'"):
        make(memory_len=4, memory_grad='all')


# --------------------------------------------------------------------------------------------- segments

def stream_of(lengths, sos=1, eos=2):
    docs = [[10 + 3 * d + i for i in range(n)] for d, n in enumerate(lengths)]
    return docs, [t for doc in docs for t in [sos, *doc, eos]]


def test_segments_are_consecutive_per_row():
    docs, stream = stream_of([5, 9, 3])  # 23 stream tokens, 22 targets
    data = SegmentDataset(TokenDataset.from_ids(docs), seq_len=4, rows=2, train_sos=True)
    assert data.row_len == 11 and len(data) == 3
    b0, b1, b2 = data[0], data[1], data[2]
    assert b0['reset'].tolist() == [True, True] and b1['reset'].tolist() == [False, False]
    assert b0['x'].tolist() == [stream[0:4], stream[11:15]]
    assert b1['x'].tolist() == [stream[4:8], stream[15:19]]
    assert b2['x'][0].tolist() == stream[8:11] + [3] and b2['y'][0].tolist() == stream[9:12] + [3]
    assert b1['y'][1].tolist() == stream[16:20]
    # documents numbered in the split, padding apart; positions restart at documents and segments
    assert b1['doc_ids'][0].tolist() == [0, 0, 0, 1] and b2['doc_ids'][0].tolist() == [1, 1, 1, PAD_DOC]
    assert b1['positions'][0].tolist() == [0, 1, 2, 0]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=6), seq_len=st.integers(1, 7),
       rows=st.integers(1, 4), world=st.integers(1, 2), train_sos=st.booleans())
def test_segments_cover_every_target_once(lengths, seq_len, rows, world, train_sos):
    docs, stream = stream_of(lengths)
    seen = {}  # stream position of each target -> target
    for rank in range(world):
        data = SegmentDataset(TokenDataset.from_ids(docs), seq_len, rows, rank=rank, world_size=world,
                              train_sos=train_sos)
        for row in range(rows):
            position = (rank * rows + row) * data.row_len
            for step in range(len(data)):
                batch = data[step]
                x, y = batch['x'][row].tolist(), batch['y'][row].tolist()
                real = [i for i, d in enumerate(batch['doc_ids'][row].tolist()) if d != PAD_DOC]
                assert real == list(range(len(real)))  # padding only at the end
                for i in real:
                    assert x[i] == stream[position]  # continues where the last step left off
                    assert position + 1 not in seen
                    seen[position + 1] = y[i]
                    position += 1
    assert sorted(seen) == list(range(1, len(stream)))
    for p, target in seen.items():
        expected = 3 if stream[p] == 1 and not train_sos else stream[p]  # <sos> after <eos> is not a target
        assert target == expected


# ------------------------------------------------------------------------------------- through Lightning

@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp('corpus')
    words = 'to be or not to be that is the question whether tis nobler in the mind'.split()
    lines = [' '.join(words[(i * 5 + j) % len(words)] for j in range(20 + (i * 7) % 60)) for i in range(40)]
    (folder / 'corpus.txt').write_text('\n'.join(lines) + '\n')
    TokenizerTrainer({'model_type': 'char'}).train(lines, 300, folder / 'char.model')
    return folder


def datamodule(corpus, tmp_path, **kwargs):
    return XLabDataModule(locations=str(corpus / 'corpus.txt'), splits={'train': 0.8, 'val': 0},
                          num_tokens=300, tokenizer_path=str(corpus / 'char.model'), seq_len=16, batch_size=3,
                          cache_dir=str(tmp_path / 'cache'), segments=True, **kwargs)


def memory_model(**kwargs):
    torch.manual_seed(0)
    return XLabModel(n_vocab=300, max_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
                     position='rope', memory_len=16, **kwargs)


def fit(tmp_path, dm, model, name, max_steps, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(max_steps=max_steps, accelerator='cpu', devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / name), callbacks=list(callbacks),
                        enable_checkpointing=bool(callbacks), num_sanity_val_steps=0, limit_val_batches=0,
                        deterministic=True)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize('memory_grad', ['none', 'recompute'])
def test_fit_with_memory_resumes_exactly(tmp_path, corpus, memory_grad):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / 'ckpt', every_n_train_steps=3,
                                                      save_top_k=-1, filename='{step}')
    full = fit(tmp_path, datamodule(corpus, tmp_path), memory_model(memory_grad=memory_grad), 'full', 6,
               callbacks=[checkpoints])
    assert len(full.trainer.train_dataloader) > 6  # the run stops mid-pass: the memory matters at the resume
    assert torch.load(tmp_path / 'ckpt' / 'step=3.ckpt', weights_only=False)['segment_memory']['state']
    resumed = fit(tmp_path, datamodule(corpus, tmp_path), memory_model(memory_grad=memory_grad), 'resumed', 6,
                  ckpt_path=str(tmp_path / 'ckpt' / 'step=3.ckpt'))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_validation_runs_with_memory(tmp_path, corpus):
    dm = datamodule(corpus, tmp_path)
    model = memory_model().eval()
    trainer = L.Trainer(accelerator='cpu', devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    val_loss = trainer.validate(model, datamodule=dm, verbose=False)[0]['val_loss']
    # the same segments by hand, with one memory across them
    memory, total, count = SegmentMemory(), 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = model.model(batch['x'], doc_ids=batch['doc_ids'], memory=memory.segment(batch['reset']))
            valid = batch['y'] != model.pad_index
            total += F.cross_entropy(logits[valid], batch['y'][valid], reduction='sum').item()
            count += int(valid.sum())
    assert val_loss == pytest.approx(total / count, rel=1e-5)
    # each process has its own rows already: Lightning keeps a DistributedSampler instead of sharding the batches
    from torch.utils.data import DistributedSampler
    assert isinstance(dm.val_dataloader().sampler, DistributedSampler)
    assert list(dm.val_dataloader().sampler) == list(range(len(dm.datasets['val'])))
    # windows without a memory give another loss; a memory model refuses them
    with pytest.raises(ValueError, match='data.segments: true'):
        trainer.validate(model, datamodule=datamodule(corpus, tmp_path).__class__(
            **{**datamodule(corpus, tmp_path).hparams, 'segments': False}), verbose=False)


def test_memory_overlay_parses(capsys):
    import os

    import yaml

    from xlabml.cli import XLabCLI
    overlay = os.path.join(os.path.dirname(__file__), '..', 'conf', 'extra', 'memory.yaml')
    with pytest.raises(SystemExit) as exit:
        XLabCLI(args=['fit', '-c', overlay, '--print_config'])
    assert exit.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config['model']['memory_len'] == 128 and config['model']['position'] == 'rope'
    assert config['data']['segments'] is True
