"""The ``xlab-infer`` command (``./infer.py CHECKPOINT PROMPT``): generate text from a trained model.

Loads a training checkpoint or an export (``.ckpt``, or ``.safetensors`` with its ``.json``) and the tokenizer
named by the checkpoint's data settings (or ``-t``) with ``xlabml.checkpoints.load_checkpoint``, which checks
that the tokenizer is the one the model was trained with, and samples, greedy-searches or beam-searches a
continuation of the prompt with ``xlabml.inference``. A LoRA run's checkpoint (adapters only) loads with the base
model it records, the adapters merged into its weights. The prompt is a string, ``FILE:path`` for a file's text,
or ``-`` for standard input. Output is the prompt followed by the continuation, with control characters other
than tab and newline escaped; it streams token by token when writing to a terminal (``--stream``/``--no-stream``).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

PROG = "xlab-infer"
SEPARATOR = "\n" + "-" * 40
DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype: torch dtype names


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _number(low: float, high: float | None = None, low_open: bool = False):
    def parse(text: str) -> float:
        value = float(text)
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
        if not ok or value != value:
            bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {bounds}")
        return value
    parse.__name__ = "number"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Generate text with an XLab model: sampling (default), greedy search "
                "or beam search.")
    p.add_argument("checkpoint", help="training checkpoint or export (.ckpt, or .safetensors beside its .json); "
                   "'last' = the newest last.ckpt under ./logs")
    p.add_argument("prompt", nargs="?", default="",
                   help="text to continue; FILE:path reads a file, '-' reads standard input (default: empty)")
    p.add_argument("-t", "--tokenizer", help="tokenizer model file (default: the one in the checkpoint's data "
                   "settings)")
    p.add_argument("-c", "--continued", action="store_true",
                   help="continue the prompt as a document already under way: no <sos> before it")
    p.add_argument("-d", "--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: auto = cuda if available)")
    p.add_argument("-n", "--runs", type=_positive_int, default=1, help="generate this many times (default 1)")
    p.add_argument("-l", "--limit", type=_positive_int, default=100, help="most tokens to generate (default 100)")
    p.add_argument("-T", "--temperature", type=_number(0.0), default=1.0,
                   help="sampling temperature, 0 = greedy (default 1.0)")
    p.add_argument("-k", "--top-k", type=_positive_int, help="sample among the k most likely tokens")
    p.add_argument("-p", "--top-p", type=_number(0.0, 1.0, low_open=True),
                   help="sample among the most likely tokens whose probability mass reaches p (nucleus)")
    p.add_argument("--min-p", type=_number(0.0, 1.0),
                   help="drop tokens less likely than min-p times the most likely one")
    p.add_argument("--repetition-penalty", type=_number(0.0, low_open=True), default=1.0,
                   help="> 1 makes tokens already in the prompt or output less likely (default 1.0)")
    p.add_argument("-s", "--seed", type=int, help="random seed: the same seed gives the same text")
    p.add_argument("-g", "--greedy-search", action="store_true", help="greedy search instead of sampling")
    p.add_argument("-b", "--beam-search", action="store_true", help="beam search instead of sampling")
    p.add_argument("-w", "--beam-width", type=_positive_int, default=4, help="beams for -b (default 4)")
    p.add_argument("-z", "--length-penalty", type=float, default=0.0,
                   help="beam score = log-prob / length**z: > 0 favours longer outputs (default 0)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are generated (default: when stdout is a terminal)")
    window = p.add_mutually_exclusive_group()
    window.add_argument("--context-keep", type=_positive_int, metavar="K",
                        help="past the model's context, restart the window at its last K tokens (faster, inexact); "
                        "default: the exact window of the last max_len tokens at every step")
    window.add_argument("--rolling", action="store_true",
                        help="past the model's context, roll the KV cache: every layer attends to the last max_len "
                        "tokens at one token's cost (RoPE, ALiBi or no positions; inexact for several layers)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                   help="weights, activations and KV cache in this precision (logits are sampled in float32); "
                   "auto = bf16 on a GPU, fp32 on a CPU (default: auto)")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="quantize the weights after loading (xlabml.quantize): int8 per output channel, int4 in groups "
                   "of 128; an export written with export-checkpoint --quantize loads quantized without it")
    p.add_argument("--draft", metavar="CHECKPOINT",
                   help="speculative decoding (xlabml.speculative): a smaller model trained with the same tokenizer "
                   "proposes tokens that the model checks several at a time; the same output distribution (greedy: "
                   "the same text), faster when the draft often agrees")
    p.add_argument("--draft-tokens", type=_positive_int, default=4, metavar="K",
                   help="tokens the draft proposes per round (default 4)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step once (pays off on a GPU; on a CPU only for long runs: "
                   "it takes tens of seconds)")
    p.add_argument("--kv-dtype", choices=("int8",), help="store the KV cache as int8 with a scale per token and head "
                   "(about 3.5x smaller in fp32, 1.8x in bf16)")
    p.add_argument("--sink-tokens", type=_positive_int, help="keep the first N tokens in the KV cache (attention "
                   "sinks; with --window or --kv-budget)")
    p.add_argument("--window", type=_positive_int, help="keep the last W tokens in the KV cache: generation of any "
                   "length with a bounded cache and no new prefill (RoPE/ALiBi models; with --sink-tokens: "
                   "StreamingLLM)")
    p.add_argument("--kv-budget", type=_positive_int, help="keep at most B tokens in the KV cache, evicting those of "
                   "least cumulative attention (H2O; the last --window, default B/2, always stay)")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors; timings on stderr")
    return p


# ---------------------------------------------------------------------------------------------------------------
# loading


def read_prompt(prompt: str) -> str:
    if prompt == "-":
        return sys.stdin.read()
    if prompt.startswith("FILE:"):
        name = prompt[len("FILE:"):]
        try:
            return Path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"prompt file {name} not found") from None
        except (IsADirectoryError, UnicodeDecodeError) as error:
            raise ValueError(f"prompt file {name} is not a UTF-8 text file ({error})") from None
    return prompt


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """Control characters other than tab and newline as Python escapes (e.g. ESC -> \\x1b, CR -> \\r)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


# ---------------------------------------------------------------------------------------------------------------
# running


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else (
            torch.float16 if device == "cuda" else torch.float32)
    return getattr(torch, DTYPES[name])


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use -d cpu or -d auto")
    return name


def _load_draft(path: str, device: str, tokenizer, checkpoint: str):
    """The draft model of --draft (which must have been trained with the target's tokenizer) and the quantization
    its checkpoint stores."""
    from .checkpoints import load_checkpoint, warn

    loaded = load_checkpoint(path, device, overrides={"compile": False}, tokenizer=False)
    if loaded.tokenizer_hash is None:
        warn(f"draft {path} records no tokenizer hash (written by an older xlabml): cannot check that it shares "
             f"the tokenizer of {checkpoint}")
    elif loaded.tokenizer_hash != tokenizer.content_hash:
        raise ValueError(f"draft {path} was trained with another tokenizer (content hash {loaded.tokenizer_hash}) "
                         f"than {checkpoint} (tokenizer {tokenizer.path}, content hash {tokenizer.content_hash}); "
                         "a draft must share the model's tokenizer")
    return loaded.model.eval().requires_grad_(False), loaded.quantization


def _apply_quantize(model, scheme, stored, checkpoint) -> None:
    """Quantizes the model as --quantize asks, unless its checkpoint stores it quantized that way already."""
    if scheme is None:
        return
    if stored is not None:
        if stored.get("scheme") != scheme:
            raise ValueError(f"checkpoint {checkpoint} holds {stored.get('scheme')} weights; --quantize {scheme} "
                             "needs its float checkpoint")
        return
    from .quantize import quantize

    quantize(model, scheme)


class _StreamPrinter:
    """Prints a growing id sequence's text: only what is settled (no trailing half character)."""

    def __init__(self, tokenizer, ids: list[int], out):
        self.tokenizer, self.ids, self.out = tokenizer, list(ids), out
        self.printed = tokenizer.decode(self.ids)
        out.write(escape_control(self.printed))
        out.flush()

    def add(self, token: int, final: bool = False) -> None:
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        settled = text if final else text.rstrip("\ufffd\ue000")  # bytes of a character yet to come
        if settled.startswith(self.printed) and len(settled) > len(self.printed):
            self.out.write(escape_control(settled[len(self.printed):]))
            self.out.flush()
            self.printed = settled


def run(args: argparse.Namespace, out=None) -> None:
    out = out or sys.stdout
    if args.greedy_search and args.beam_search:
        raise ValueError("-g/--greedy-search and -b/--beam-search exclude each other; choose one")
    if args.draft is not None and args.beam_search:
        raise ValueError("--draft works with sampling and greedy search, not beam search")
    if args.draft is not None and (args.sink_tokens or args.window is not None or args.kv_budget is not None):
        given = [f for f, v in (("--sink-tokens", args.sink_tokens), ("--window", args.window),
                                ("--kv-budget", args.kv_budget)) if v is not None]
        raise ValueError(f"--draft takes --kv-dtype but not {', '.join(given)}: a speculative round rewinds the "
                         "caches over rejected drafts, which a cache that drops tokens cannot undo")
    if args.draft is not None and not Path(args.draft).is_file():
        raise FileNotFoundError(f"draft checkpoint {args.draft} not found")
    if args.checkpoint == "last" and not Path("last").exists():
        from .cli import find_last_checkpoint

        args.checkpoint = find_last_checkpoint()
    if not Path(args.checkpoint).is_file():  # before the slow imports of loading
        raise FileNotFoundError(f"checkpoint {args.checkpoint} not found")
    prompt = read_prompt(args.prompt)
    import torch

    from . import inference, speculative
    from .checkpoints import load_checkpoint
    from .cli import one_line_warnings

    one_line_warnings(PROG)
    device = _device(args.device)
    started = time.perf_counter()
    # compiling the whole model is for training; inference compiles its decode step (--compile)
    # a LoRA run's adapters are folded into the base they record: the same outputs, without the adapters' matmuls
    loaded = load_checkpoint(args.checkpoint, device, overrides={"compile": False}, tokenizer=args.tokenizer,
                             merge_lora=True)
    model, tokenizer = loaded.model.eval().requires_grad_(False), loaded.tokenizer
    model = model.to(_dtype(args.dtype, device))
    _apply_quantize(model, args.quantize, loaded.quantization, args.checkpoint)
    if tokenizer is None:
        raise ValueError(f"checkpoint {args.checkpoint} names no tokenizer; give one with -t/--tokenizer")
    # a segment memory's tokens are context too: generation keeps them in the KV cache
    n_vocab, block_size = model.hparams["n_vocab"], model.hparams["max_len"] + model.hparams.get("memory_len", 0)
    compression = inference.cache_options(args.kv_dtype, args.sink_tokens or 0, args.window, args.kv_budget)
    draft = None
    if args.draft is not None:
        draft, stored = _load_draft(args.draft, device, tokenizer, args.checkpoint)
        draft = draft.to(_dtype(args.dtype, device))
        _apply_quantize(draft, args.quantize, stored, args.draft)
    if len(tokenizer) <= 4:
        raise ValueError(f"tokenizer {tokenizer.path} has an empty vocabulary (only the 4 special tokens)")
    ids = ([] if args.continued else [tokenizer[tokenizer.sos_token]]) + tokenizer.encode(prompt)
    if not ids:
        raise ValueError("empty prompt with -c/--continued: nothing to continue")
    x = torch.tensor(ids, device=device)
    eos = tokenizer[tokenizer.eos_token]
    # never generate what cannot be decoded or cannot follow: <sos>, <pad>, classes past the tokenizer
    excluded = [tokenizer[tokenizer.sos_token], tokenizer[tokenizer.pad_token], *range(len(tokenizer), n_vocab)]
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, generator=generator)
    if args.greedy_search:
        sampling = dict(temperature=0.0, repetition_penalty=args.repetition_penalty)
    sliding = dict(context_keep=args.context_keep, rolling=args.rolling)
    stream = out.isatty() if args.stream is None else args.stream
    stats = speculative.SpeculativeStats()
    speculating = {}
    if draft is not None:
        speculating = dict(draft_tokens=args.draft_tokens, draft_block_size=min(block_size, draft.hparams["max_len"]),
                           stats=stats, compile=args.compile,  # compiles the draft's one-token step
                           **{k: v for k, v in compression.items() if k == "kv_dtype"})
    loaded = time.perf_counter()
    generated = 0
    for run_index in range(args.runs):
        if run_index:
            out.write(SEPARATOR + "\n")
        if args.beam_search:
            new = inference.beam_search(model, x, args.beam_width, args.limit, block_size, eos_class=eos,
                                        exclude_classes=excluded, length_penalty=args.length_penalty,
                                        **sliding, **compression).tolist()
        elif stream:
            printer = _StreamPrinter(tokenizer, ids, out)
            new = []
            if draft is not None:
                tokens = speculative.speculative_stream(model, draft, x, args.limit, block_size, eos_class=eos,
                                                        exclude_classes=excluded, **speculating, **sliding,
                                                        **sampling)
            else:
                tokens = inference.generate_stream(model, x, args.limit, block_size, eos_class=eos,
                                                   exclude_classes=excluded, compile=args.compile, **sliding,
                                                   **sampling, **compression)
            for token in tokens:
                new.append(token)
                printer.add(token)
            printer.add(None, final=True)
            out.write("\n")
            generated += len(new)
            continue
        elif draft is not None:
            new = speculative.speculative_sample(model, draft, x, args.limit, block_size, eos_class=eos,
                                                 exclude_classes=excluded, **speculating, **sliding,
                                                 **sampling).tolist()
        else:
            new = inference.sample(model, x, args.limit, block_size, eos_class=eos, exclude_classes=excluded,
                                   compile=args.compile, **sliding, **sampling, **compression).tolist()
        generated += len(new)
        out.write(escape_control(tokenizer.decode(ids + new)) + "\n")
        out.flush()
    if args.debug:
        seconds = time.perf_counter() - loaded
        print(f"{PROG}: loaded in {loaded - started:.2f} s; {generated} tokens in {seconds:.2f} s "
              f"({generated / max(seconds, 1e-9):.1f} tokens/s) on {device}", file=sys.stderr)
        if draft is not None:
            print(f"{PROG}: draft tokens accepted: {stats.accepted} of {stats.drafted} "
                  f"({stats.acceptance_rate:.0%}) in {stats.rounds} rounds", file=sys.stderr)


def run_command(prog: str, run, args) -> None:
    """``run(args)`` as a command: an error is one line on stderr and exit status 1 (the traceback with
    ``args.debug``), Ctrl-C exits 130, a closed output pipe (e.g. piped into head) exits 0."""
    try:
        run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as error:  # noqa: BLE001 - one line, non-zero exit
        if args.debug:
            raise
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    run_command(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
