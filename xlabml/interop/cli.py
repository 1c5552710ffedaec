"""The interop subcommands of ``xlab-manage`` (``./manage.py``): ``export-hf``, ``import-hf``, ``export-gguf``,
``evaluate``, as ``COMMANDS`` entries that ``manage.py`` adds to its own. They parse arguments and call the
library functions; ``manage.py`` prints any error as one line."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _export_hf(args: argparse.Namespace) -> None:
    from .hf import export_hf

    outdir, cls, reasons = export_hf(args.checkpoint, args.outdir, tokenizer=args.tokenizer, force_custom=args.custom)
    if cls == "XLabForCausalLM":
        print(f"exported {outdir} as XLabForCausalLM: load with trust_remote_code=True (needs pip install "
              f"'xlabml[hf]' there)")
        if not args.custom:
            print("no stock class fits: " + "; ".join(f"{c}: {why}" for c, why in reasons.items()))
    else:
        print(f"exported {outdir} as {cls} (a stock transformers class: no custom code needed)")


def _import_hf(args: argparse.Namespace) -> None:
    from .hf import import_hf

    out, tokenizer, notes = import_hf(args.hf_dir, args.out_ckpt, tokenizer=args.tokenizer,
                                      approximate=args.approximate)
    print(f"imported {args.hf_dir} into {out}" + (f" with tokenizer {tokenizer}" if tokenizer else ""))
    for note in notes:
        print(f"approximation: {note}")
    if tokenizer is None:
        print("no XLab tokenizer: the checkpoint holds the weights only; a Llama/GPT-2 tokenizer is not an XLab "
              "tokenizer (other special ids, no escaping). Give infer.py -t/--tokenizer, or data.tokenizer_path "
              "for training, an XLab tokenizer of at most the model's vocabulary size (or rerun with --tokenizer)")


def _export_gguf(args: argparse.Namespace) -> None:
    from .gguf import APPROXIMATE, export_gguf

    out, arch = export_gguf(args.checkpoint, args.out, out_type=args.type, tokenizer=args.tokenizer)
    print(f"exported {out} ({arch}, {args.type}, {Path(out).stat().st_size / 2**20:.1f} MiB)")
    if arch in APPROXIMATE:
        print(f"note: {APPROXIMATE[arch]}")


def _evaluate(args: argparse.Namespace) -> None:
    from xlabml.atomic import write_atomic

    from .lm_eval import evaluate

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError("--tasks is empty; expected comma-separated lm-eval task names")
    if args.no_builtin_tasks and not args.include_path:
        raise ValueError("--no-builtin-tasks needs --include-path DIR (the tasks to run)")
    results = evaluate(args.checkpoint, tasks, device=args.device, batch_size=args.batch_size,
                       num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path,
                       include_defaults=not args.no_builtin_tasks, tokenizer=args.tokenizer)
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        write_atomic(args.output, json.dumps({k: results[k] for k in ("results", "versions", "n-shot", "config")
                                              if k in results}, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")


def _export_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="training checkpoint or export (.ckpt, or .safetensors beside its .json)")
    p.add_argument("outdir", help="directory to create")
    p.add_argument("-t", "--tokenizer", help="tokenizer model file (default: the checkpoint's)")
    p.add_argument("--custom", action="store_true", help="write XLabForCausalLM even where a stock class fits")


def _import_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="transformers model directory (config.json + safetensors or .bin weights)")
    p.add_argument("out_ckpt", help="checkpoint file to create")
    p.add_argument("-t", "--tokenizer", help="an XLab tokenizer model file for the model (default: HF_DIR's "
                   "tokenizer.model if it is an XLab tokenizer, else none)")
    p.add_argument("--approximate", action="store_true",
                   help="accept what XLab computes only approximately (tanh GELU, another norm epsilon)")


def _export_gguf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="training checkpoint or export")
    p.add_argument("out", help="GGUF file to create")
    p.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16", help="weight type (default f16)")
    p.add_argument("-t", "--tokenizer", help="tokenizer model file (default: the checkpoint's)")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="training checkpoint or export")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward (default 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    p.add_argument("--include-path", help="directory of extra task YAML files")
    p.add_argument("--no-builtin-tasks", action="store_true",
                   help="only the tasks under --include-path (skips indexing lm-eval's built-in tasks, ~15 s)")
    p.add_argument("-t", "--tokenizer", help="tokenizer model file (default: the checkpoint's)")
    p.add_argument("-o", "--output", help="write the results as JSON to this new file")


# name -> (one-line help, --help description, adds the arguments, runs it): manage.py makes each a Command
COMMANDS = {
    "export-hf": (
        "write a Hugging Face transformers model directory",
        "Write CHECKPOINT as a transformers directory OUTDIR (safetensors, config, tokenizer, generation config, "
        "model card): a stock Llama/Mistral/Qwen3/GPT-2/GPT-NeoX class when the architecture is exactly one, else "
        "XLabForCausalLM (trust_remote_code). OUTDIR must not exist.",
        _export_hf_arguments, _export_hf),
    "import-hf": (
        "convert a local Llama or GPT-2 transformers directory to a checkpoint",
        "Convert a local LlamaForCausalLM or GPT2LMHeadModel directory (or an XLabForCausalLM export) into an XLab "
        "checkpoint OUT_CKPT (must not exist) for infer.py, warm starts and export-hf.",
        _import_hf_arguments, _import_hf),
    "export-gguf": (
        "write a GGUF file for llama.cpp (Llama and GPT-2 layouts)",
        "Write CHECKPOINT as a GGUF file OUT (must not exist) for llama.cpp.",
        _export_gguf_arguments, _export_gguf),
    "evaluate": (
        "run lm-evaluation-harness tasks on a checkpoint",
        "Evaluate CHECKPOINT on lm-eval tasks with the xlab model backend.",
        _evaluate_arguments, _evaluate),
}
