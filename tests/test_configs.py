"""The release configuration's training budget: what validation costs, the optimizer's batch, the loss."""
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RELEASE = yaml.safe_load((REPO / 'conf' / 'xlab.yaml').read_text())
RELEASE_ROWS = 256  # sequences of 512 tokens per optimizer step (the seed's batch)


def test_release_validation_budget_is_a_small_fixed_share_of_training():
    trainer = RELEASE['trainer']
    # absolute counts: a fraction of the split or of an epoch would make the share depend on the data's size
    assert isinstance(trainer['limit_val_batches'], int) and isinstance(trainer['val_check_interval'], int)
    assert trainer['check_val_every_n_epoch'] is None  # the interval counts batches across epochs
    # a validation batch is a forward pass, about a third of a training batch (forward and backward)
    share = trainer['limit_val_batches'] / (3 * trainer['val_check_interval'])
    assert share <= 0.02  # the whole 5% split five times an epoch cost 5 * 0.05 / 0.9 / 3 = 9%
    tokens = trainer['limit_val_batches'] * RELEASE['data']['batch_size'] * RELEASE['data']['seq_len']
    assert tokens >= 5_000_000  # enough tokens that two validations of one model agree closely


def test_release_optimizer_batch_and_chunked_loss():
    rows = RELEASE['data']['batch_size'] * RELEASE['trainer'].get('accumulate_grad_batches', 1)
    assert rows == RELEASE_ROWS  # accumulation keeps the release batch per optimizer step
    assert RELEASE['trainer']['accumulate_grad_batches'] > 1  # so that a 40 GB card holds a batch
    chunk = RELEASE['model']['loss_chunk_size']
    assert 0 < chunk < RELEASE['data']['batch_size'] * RELEASE['data']['seq_len']
