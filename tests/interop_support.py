"""Helpers shared by the interop tests: a small tokenizer, tiny XLab checkpoints with random weights."""
from pathlib import Path

import torch

from xlabml.checkpoints import DATA_STATE_KEY
from xlabml.corpus import iter_builtin_texts
from xlabml.models import XLabModel
from xlabml.tokenizer import Tokenizer, TokenizerTrainer

VOCAB = 700  # tokenizer size
N_VOCAB = 720  # model classes: a few rows past the tokenizer, as a model sized by num_tokens may have
TINY = dict(n_vocab=N_VOCAB, max_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)


def train_tokenizer(directory: Path):
    texts = list(iter_builtin_texts("python-topics"))[:30]
    return TokenizerTrainer({"num_threads": 1}).train(iter(texts), VOCAB, directory / "tokenizer.model")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of unit scale (activations and logits of order one, so greedy choices are not near ties), norms
    around 1, biases around 0: every parameter matters for parity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif p.dim() == 2 and "embedding" in name:  # small: a tied head gives logits of a few units
                p.copy_(0.3 * noise)
            elif name.endswith("head.weight"):  # logits of a few units: fp32 rounding stays near 1e-6
                p.copy_(0.3 * noise / p.shape[-1] ** 0.5)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def make_checkpoint(path: Path, tokenizer_path, seed: int = 0, extra: dict | None = None, zero: tuple = (), **arch):
    """A checkpoint as Lightning writes one (state_dict, hyper_parameters, datamodule_hyper_parameters); parameters
    whose names end with one of ``zero`` are zeros."""
    model = randomize(XLabModel(**{**TINY, **arch}), seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(zero):
                p.zero_()
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "datamodule_hyper_parameters": {"tokenizer_path": str(tokenizer_path)}, "global_step": 10,
                  **(extra or {})}
    if Path(tokenizer_path).is_file():  # the tokenizer's identity, as XLabDataModule.state_dict records it
        checkpoint[DATA_STATE_KEY] = {"tokenizer_hash": Tokenizer.load(tokenizer_path).content_hash,
                                      "tokenizer_path": str(tokenizer_path)}
    torch.save(checkpoint, path)
    return path, model


def excluded(tokenizer, n_vocab=N_VOCAB):
    return [tokenizer.sos_id, tokenizer.pad_id, *range(len(tokenizer), n_vocab)]
