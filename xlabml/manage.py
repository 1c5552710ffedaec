"""The ``xlab-manage`` command (``./manage.py``): housekeeping on checkpoints.

``export-checkpoint CKPT [--format ckpt|safetensors] [-o DIR]`` writes the weights and the hyperparameters needed
to rebuild the model and find its tokenizer, with the tokenizer's content hash, without optimizer state, loops or
callbacks (about a third of a training checkpoint), under a name carrying a short hash of the file's content
(``xlabml.checkpoints.export_checkpoint``); ``--quantize int8`` (or ``int4``) stores the weights quantized
(``xlabml.quantize``: about a quarter of the float32 export), which the one loader reads back into a quantized
model. Files are written atomically and never overwritten: exporting the
same weights twice finds the file already there.

``add-chat-tokens TOKENIZER OUTPUT`` writes the chat tokenizer of a tokenizer: the same vocabulary with the
chat template's role tokens appended (``xlabml.chat.make_chat_tokenizer``), for instruction tuning a model
pretrained with it.

``merge-lora CKPT OUT [--base PATH]`` folds the adapters of a LoRA run's checkpoint into its base model's weights
and writes a plain checkpoint (``.ckpt`` or ``.safetensors``) that loads without the base
(``xlabml.checkpoints.merge_lora_checkpoint``); never overwrites.

Each subcommand is a ``COMMANDS`` entry (a ``Command``); the work itself is done by library functions.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, NamedTuple, Optional

PROG = "xlab-manage"


class Command(NamedTuple):
    """A subcommand: its one-line help, its --help description, a function adding its arguments to its
    subparser, and a function running it on the parsed arguments."""

    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size} B"


# ---------------------------------------------------------------------------------------------------------------
# export-checkpoint


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint (.ckpt) written by xlab fit")
    parser.add_argument("--format", choices=("ckpt", "safetensors"), default="ckpt",
                        help="ckpt: one torch file; safetensors: weights + a JSON of hyperparameters (default: ckpt)")
    parser.add_argument("-o", "--output-dir", default="exports", help="directory to write to (default: exports)")
    parser.add_argument("--quantize", choices=("int8", "int4"),
                        help="store the weights quantized: int8 per output channel, or int4 in groups (linear layers "
                        "whose rows the groups divide; the rest int8); loads as a quantized model")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128, 256),
                        help="weights per group of --quantize int4 (default 128)")


def _export(args: argparse.Namespace) -> None:
    from xlabml.checkpoints import export_checkpoint

    if args.group_size is not None and args.quantize != "int4":
        raise ValueError(f"--group-size {args.group_size} applies to --quantize int4 only")
    path, written = export_checkpoint(args.checkpoint, args.output_dir, args.format, quantize=args.quantize,
                                      group_size=args.group_size)
    source = Path(args.checkpoint).stat().st_size
    files = [path] + ([path.with_suffix(".json")] if path.suffix == ".safetensors" else [])
    size = sum(p.stat().st_size for p in files)
    if written:
        print(f"exported {path} ({_human(size)}, {size / source:.0%} of {args.checkpoint})")
    else:
        print(f"{path} already exists with this content; nothing written")


# ---------------------------------------------------------------------------------------------------------------
# add-chat-tokens


def _chat_tokens_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tokenizer", help="the tokenizer model file the model was pretrained with")
    parser.add_argument("output", help="where to write the chat tokenizer (never overwritten)")


def _chat_tokens(args: argparse.Namespace) -> None:
    from xlabml.chat import ChatTemplate, make_chat_tokenizer

    tokenizer = make_chat_tokenizer(args.tokenizer, args.output)
    template = ChatTemplate(tokenizer)
    ids = ", ".join(f"{role} {index}" for role, index in template.role_ids.items())
    print(f"wrote {args.output}: {len(tokenizer)} tokens (role tokens {ids}; content hash {tokenizer.content_hash}); "
          f"train with data.tokenizer_path: {args.output} and data.num_tokens >= {len(tokenizer)}")


# ---------------------------------------------------------------------------------------------------------------
# merge-lora


def _merge_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint (or export) of a LoRA run (model.lora)")
    parser.add_argument("out", help="the merged checkpoint to write: NAME.ckpt, or NAME.safetensors (+ NAME.json)")
    parser.add_argument("--base", help="the base model, if it is no longer where the checkpoint records it (its "
                        "weights must be the same: checked by hash)")


def _merge_lora(args: argparse.Namespace) -> None:
    from xlabml.checkpoints import merge_lora_checkpoint

    path = merge_lora_checkpoint(args.checkpoint, args.out, base=args.base)
    files = [path] + ([path.with_suffix(".json")] if path.suffix == ".safetensors" else [])
    print(f"merged {args.checkpoint} into {path} ({_human(sum(p.stat().st_size for p in files))})")


COMMANDS: dict[str, Command] = {
    "export-checkpoint": Command(
        "write a slim checkpoint (weights + hyperparameters) named by its content hash",
        "Write the weights (quantized with --quantize), the hyperparameters needed to load the model, its tokenizer "
        "path and the tokenizer's content hash (no optimizer state) to DIR/<name>-<hash>.<format>, atomically; "
        "never overwrites.",
        _export_arguments,
        _export,
    ),
    "add-chat-tokens": Command(
        "write a chat tokenizer: a tokenizer with the chat template's role tokens appended",
        "Write TOKENIZER with the role tokens <|system|>, <|user|>, <|assistant|> appended as control tokens "
        "(xlabml.chat) to OUTPUT, atomically; never overwrites. Ids of TOKENIZER keep their meaning, so a model "
        "pretrained with it can be instruction-tuned with the result (data.format: chat).",
        _chat_tokens_arguments,
        _chat_tokens,
    ),
    "merge-lora": Command(
        "write a LoRA run's model with its adapters merged into the base, as a plain checkpoint",
        "Load the adapters of CHECKPOINT and the base model they record (path, checked by weights hash), fold the "
        "adapters into the weights and write the result to OUT (.ckpt or .safetensors) atomically; never "
        "overwrites. The result loads like any export, without the base.",
        _merge_lora_arguments,
        _merge_lora,
    ),
}
# export-hf, import-hf, export-gguf, evaluate: moving models to and from other tools (xlabml.interop.cli)
from xlabml.interop.cli import COMMANDS as INTEROP_COMMANDS  # noqa: E402  (needs nothing of this module)

COMMANDS.update({name: Command(*spec) for name, spec in INTEROP_COMMANDS.items()})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="XLab housekeeping commands.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help, description=command.description))
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    from xlabml.cli import one_line_warnings

    from xlabml.infer_cli import run_command

    one_line_warnings(PROG)
    run_command(PROG, COMMANDS[args.command].run, args)  # one-line errors, Ctrl-C exits 130


if __name__ == "__main__":
    main()
