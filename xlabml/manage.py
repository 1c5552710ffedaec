"""The ``xlab-manage`` command (``./manage.py``): housekeeping on checkpoints.

``export-checkpoint CKPT [--format ckpt|safetensors] [-o DIR]`` writes the weights and the hyperparameters needed
to rebuild the model and find its tokenizer, without optimizer state, loops or callbacks (about a third of a
training checkpoint), under a name carrying a short hash of the file's content. An existing file is never
overwritten: exporting the same weights twice finds the file already there.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

PROG = "xlab-manage"
HASH_CHARS = 8
FORMAT_VERSION = 1
# The keys Lightning's load_from_checkpoint reads, for the model and for the data module.
KEPT_KEYS = (
    "pytorch-lightning_version",
    "epoch",
    "global_step",
    "hparams_name",
    "hyper_parameters",
    "datamodule_hparams_name",
    "datamodule_hyper_parameters",
)


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint (weights_only, on the CPU), raising one clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a loadable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
    if "hyper_parameters" not in checkpoint:
        raise ValueError(f"{path} has no 'hyper_parameters': the model could not be rebuilt from an export")
    return checkpoint


def slim_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The export's content: weights plus the hyperparameters of model and data module (tokenizer path)."""
    slim = {key: checkpoint[key] for key in KEPT_KEYS if key in checkpoint}
    # Detached contiguous copies: no views into the optimizer's or other tensors' storage get saved along.
    state_dict, seen = {}, {}
    for name, tensor in checkpoint["state_dict"].items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:  # tied weights stay tied
            state_dict[name] = state_dict[seen[key]]
        else:
            seen[key] = name
            state_dict[name] = tensor.detach().contiguous().clone()
    slim["state_dict"] = state_dict
    slim["xlab_export"] = FORMAT_VERSION
    return slim


def _serialize_ckpt(slim: dict[str, Any]) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    return {".ckpt": buffer.getvalue()}


def _serialize_safetensors(slim: dict[str, Any]) -> dict[str, bytes]:
    from safetensors.torch import save

    tensors, aliases, seen = {}, {}, {}
    for name, tensor in slim["state_dict"].items():
        if id(tensor) in seen:  # safetensors refuses shared storage: store once, record the alias
            aliases[name] = seen[id(tensor)]
        else:
            seen[id(tensor)] = name
            tensors[name] = tensor
    meta = {key: value for key, value in slim.items() if key != "state_dict"}
    meta["aliases"] = aliases
    data = save(tensors, metadata={"format": "pt", "xlab_export": str(FORMAT_VERSION)})
    sidecar = json.dumps(meta, indent=2, sort_keys=True, default=str).encode() + b"\n"
    return {".safetensors": data, ".json": sidecar}


def export_checkpoint(
    ckpt_path: str | os.PathLike, output_dir: str | os.PathLike = "exports", format: str = "ckpt"
) -> tuple[Path, bool]:
    """Export a training checkpoint; returns (path of the main file, whether it was written now).

    The name is ``<checkpoint stem>-<first 8 hex digits of the main file's sha256>.<ext>``; if that file already
    exists it holds the same content and nothing is written.
    """
    serializers = {"ckpt": _serialize_ckpt, "safetensors": _serialize_safetensors}
    if format not in serializers:
        raise ValueError(f"unknown export format {format!r}; expected one of {sorted(serializers)}")
    slim = slim_checkpoint(load_training_checkpoint(ckpt_path))
    files = serializers[format](slim)
    main_ext = "." + format
    digest = hashlib.sha256(files[main_ext]).hexdigest()[:HASH_CHARS]
    output_dir = Path(output_dir)
    stem = f"{Path(ckpt_path).stem}-{digest}"
    targets = {ext: output_dir / f"{stem}{ext}" for ext in files}
    existing = [ext for ext, path in targets.items() if path.exists()]
    for ext in existing:
        if targets[ext].read_bytes() != files[ext]:
            raise FileExistsError(f"{targets[ext]} exists with different content; refusing to overwrite it")
    if len(existing) == len(targets):
        return targets[main_ext], False
    output_dir.mkdir(parents=True, exist_ok=True)
    for ext, data in files.items():
        if ext not in existing:
            with open(targets[ext], "xb") as f:  # "x": fail rather than overwrite, even if another process raced us
                f.write(data)
    return targets[main_ext], True


def load_exported_model(path: str | os.PathLike, map_location: Any = "cpu"):
    """Load an export of either format (or a training checkpoint) as an ``XLabModel``."""
    from xlabml.models import XLabModel

    path = Path(path)
    if path.suffix != ".safetensors":
        return XLabModel.load_from_checkpoint(path, map_location=map_location)
    checkpoint = load_safetensors_export(path)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return XLabModel.load_from_checkpoint(buffer, map_location=map_location)


def load_safetensors_export(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``NAME.safetensors`` + ``NAME.json`` back into a checkpoint dict ``load_from_checkpoint`` accepts."""
    from safetensors.torch import load_file

    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar} not found: a safetensors export needs its JSON of hyperparameters")
    meta = json.loads(sidecar.read_text())
    state_dict = load_file(str(path))
    for name, target in meta.pop("aliases", {}).items():
        state_dict[name] = state_dict[target]
    return {**meta, "state_dict": state_dict}


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="XLab housekeeping commands.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export = commands.add_parser(
        "export-checkpoint",
        help="write a slim checkpoint (weights + hyperparameters) named by its content hash",
        description="Write the weights and the hyperparameters needed to load the model and its tokenizer path "
        "(no optimizer state) to DIR/<name>-<hash>.<format>; never overwrites.",
    )
    export.add_argument("checkpoint", help="a training checkpoint (.ckpt) written by xlab fit")
    export.add_argument("--format", choices=("ckpt", "safetensors"), default="ckpt",
                        help="ckpt: one torch file; safetensors: weights + a JSON of hyperparameters (default: ckpt)")
    export.add_argument("-o", "--output-dir", default="exports", help="directory to write to (default: exports)")
    from xlabml.interop.cli import add_commands  # export-hf, import-hf, export-gguf, evaluate: each sets args.run

    add_commands(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export-checkpoint":
            path, written = export_checkpoint(args.checkpoint, args.output_dir, args.format)
            source = Path(args.checkpoint).stat().st_size
            files = [path] + ([path.with_suffix(".json")] if path.suffix == ".safetensors" else [])
            size = sum(p.stat().st_size for p in files)
            if written:
                print(f"exported {path} ({_human(size)}, {size / source:.0%} of {args.checkpoint})")
            else:
                print(f"{path} already exists with this content; nothing written")
        elif hasattr(args, "run"):  # the interop commands (xlabml.interop.cli)
            args.run(args)
    except Exception as error:  # noqa: BLE001 - one line, non-zero exit
        if args.debug:
            raise
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
