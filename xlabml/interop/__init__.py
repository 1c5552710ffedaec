"""Moving XLab models to and from other tools.

- ``xlabml.interop.hf``: ``export_hf`` (a Hugging Face ``transformers`` directory: a stock Llama, Mistral,
  Qwen3, GPT-2 or GPT-NeoX model where the architecture is exactly one of those, else ``XLabForCausalLM``) and
  ``import_hf`` (a local Llama or GPT-2 directory becomes an XLab checkpoint). Needs ``pip install 'xlabml[hf]'``.
- ``xlabml.interop.hf_tokenizer``: the XLab tokenizer as a ``tokenizers`` pipeline (``tokenizer.json``).
- ``xlabml.interop.hf_model``: ``XLabConfig`` / ``XLabForCausalLM``, the ``transformers`` wrapper of the XLab
  decoder for every variant no stock architecture computes.
- ``xlabml.interop.gguf``: ``export_gguf`` for llama.cpp (Llama and GPT-2 layouts). Needs ``xlabml[gguf]``.
- ``xlabml.interop.lm_eval``: the ``xlab`` model of lm-evaluation-harness. Needs ``xlabml[eval]``.
- ``xlabml.interop.cli``: the ``export-hf``, ``import-hf``, ``export-gguf`` and ``evaluate`` commands of
  ``./manage.py``.

Every writer builds its output in a temporary sibling and moves it into place (``atomic_dir`` here for
directories, ``xlabml.atomic`` for files), and never replaces an existing file or directory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def load_model(checkpoint: str | os.PathLike, device: str = "cpu", tokenizer: str | os.PathLike | None = None):
    """A checkpoint (training checkpoint or export) and its tokenizer through ``xlabml.checkpoints.load_checkpoint``
    (which checks that the tokenizer is the one the model was trained with): a ``LoadedCheckpoint`` whose model is
    in eval mode without gradients and whose ``tokenizer`` is set; one clear error when there is none. LoRA
    adapters are merged into the weights: other tools get a plain model."""
    from xlabml.checkpoints import load_checkpoint

    loaded = load_checkpoint(checkpoint, device, overrides={"compile": False}, tokenizer=tokenizer, merge_lora=True)
    if loaded.tokenizer is None:
        raise ValueError(f"checkpoint {checkpoint} names no tokenizer; give one with -t/--tokenizer")
    loaded.model.eval().requires_grad_(False)
    return loaded


def require(module: str, extra: str):
    """Import an optional dependency, or raise one clear line naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this needs the '{module}' package: pip install 'xlabml[{extra}]'") from None


def check_new(path: str | os.PathLike) -> Path:
    """``path`` as a Path, after checking that nothing exists there (exports never overwrite)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (choose a new path)")
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yields a temporary directory beside ``path``; on success it is renamed to ``path`` (which must not exist),
    on error it is removed. Readers never see a half-written directory."""
    path = check_new(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        check_new(path)
        os.rename(tmp, path)  # fails rather than replace a directory created meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
