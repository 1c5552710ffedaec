"""The ``xlab-serve`` command (``./serve.py CHECKPOINT``): serve a model over an OpenAI-compatible HTTP API.

Loads the checkpoint and its tokenizer with ``xlabml.checkpoints.load_checkpoint`` (the tokenizer is checked
against the one the model was trained with) and runs ``xlabml.serve.app`` with uvicorn. It binds 127.0.0.1
unless ``--host`` says otherwise; with ``--api-key`` (or ``XLAB_API_KEY``) every ``/v1`` request must carry the
key.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from xlabml.infer_cli import DTYPES, _device, _dtype, _Parser, _positive_int, run_command

PROG = "xlab-serve"
API_KEY_ENV = "XLAB_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve an XLab model over an OpenAI-compatible HTTP API: /v1/completions, "
                "/v1/chat/completions, /v1/models, /health.")
    p.add_argument("checkpoint", help="training checkpoint or export (.ckpt, or .safetensors beside its .json); "
                   "'last' = the newest last.ckpt under ./logs")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint's file name without "
                   "its extension)")
    p.add_argument("-t", "--tokenizer", help="tokenizer model file (default: the one in the checkpoint's data "
                   "settings)")
    p.add_argument("-d", "--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: auto = cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                   help="weights, activations and KV cache in this precision; auto = bf16 on a GPU, fp32 on a "
                   "CPU (default: auto)")
    p.add_argument("--max-tokens", type=_positive_int,
                   help="the most tokens one choice may generate, and chat's default (default: the model's "
                   "context length)")
    p.add_argument("--max-prompt-tokens", type=_positive_int,
                   help="the longest prompt in tokens (default: the model's context length)")
    p.add_argument("--max-n", type=_positive_int, default=8, help="the most choices per prompt, n (default 8)")
    p.add_argument("--max-batch", type=_positive_int, default=16,
                   help="the most choices generated together (default 16)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="the most choices waiting for room in the batch; more get 429 (default 64)")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors; access log")
    return p


def build(args: argparse.Namespace):
    """The application for the parsed arguments (loads the model)."""
    try:
        from xlabml.serve.app import Limits, create_app
    except ImportError as error:
        raise ImportError(f"xlab-serve needs the serve extra ({error}): pip install 'xlabml[serve]'") from None
    from xlabml.checkpoints import load_checkpoint
    from xlabml.cli import find_last_checkpoint, one_line_warnings

    if args.checkpoint == "last" and not Path("last").exists():
        args.checkpoint = find_last_checkpoint()
    if not Path(args.checkpoint).is_file():  # before the slow imports of loading
        raise FileNotFoundError(f"checkpoint {args.checkpoint} not found")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a port number (0-65535)")
    one_line_warnings(PROG)
    device = _device(args.device)
    # compiling the whole model is for training; generation runs eagerly
    # a LoRA run's adapters are folded into the base they record: the same outputs, one matmul per layer
    loaded = load_checkpoint(args.checkpoint, device, overrides={"compile": False}, tokenizer=args.tokenizer,
                             merge_lora=True)
    if loaded.tokenizer is None:
        raise ValueError(f"checkpoint {args.checkpoint} names no tokenizer; give one with -t/--tokenizer")
    if len(loaded.tokenizer) <= 4:
        raise ValueError(f"tokenizer {loaded.tokenizer.path} has an empty vocabulary (only the 4 special tokens)")
    model = loaded.model.eval().requires_grad_(False).to(_dtype(args.dtype, device))
    block_size = model.hparams["max_len"]
    limits = Limits(max_tokens=args.max_tokens or block_size, max_prompt_tokens=args.max_prompt_tokens or block_size,
                    max_n=args.max_n, max_batch=args.max_batch, max_queue=args.max_queue)
    name = args.model_name or Path(args.checkpoint).stem
    return create_app(model, loaded.tokenizer, name=name, limits=limits, api_key=args.api_key or None,
                      checkpoint=loaded, created=int(Path(args.checkpoint).stat().st_mtime))


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), or one clear error (e.g. the port is taken)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return sock


def run(args: argparse.Namespace) -> None:
    app = build(args)
    import uvicorn

    sock = listen(args.host, args.port)
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"{PROG}: warning: serving on {args.host} without an API key: anyone who can reach this port can "
              f"use the model (set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    print(f"{PROG}: serving {app.state.served.name!r} at http://{host}:{port}/v1 "
          f"({'an API key is required' if args.api_key else 'no API key'})", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info" if args.debug else "warning",
                                           access_log=args.debug))
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    run_command(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
