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

Every writer builds its output in a temporary sibling and renames it into place, and never replaces an existing
file or directory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """The one place interop reads an XLab checkpoint (training checkpoint or export): returns ``(model,
    data_hparams)``, the ``XLabModel`` in eval mode and the data module's hyperparameters (tokenizer path)."""
    from xlabml.infer_cli import load_checkpoint as load

    return load(str(path), device)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw dict of a checkpoint (training checkpoint, ``.ckpt`` export, or ``.safetensors`` export with its
    ``.json``), on the CPU, for what the model loader does not return (recorded metrics, the step, weights alone
    for a warm start). One clear error for a file that is not a checkpoint."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from xlabml.manage import load_safetensors_export

        checkpoint = load_safetensors_export(path)
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise ValueError(f"{path} is not a loadable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not an XLab checkpoint: it has no 'state_dict'")
    return checkpoint


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


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yields a temporary file path beside ``path``; on success it is linked to ``path`` (which must not exist:
    ``os.link`` fails rather than replace), on error it is removed."""
    path = check_new(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
