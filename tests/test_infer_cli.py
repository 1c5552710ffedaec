"""The xlab-infer command on a tiny checkpoint built here: outputs equal the library's, errors are one line."""
import importlib.util
import io
import os
import subprocess
import sys

import pytest
import torch

from xlabml import infer_cli, inference
from xlabml.checkpoints import CheckpointWarning, export_checkpoint
from xlabml.models import XLabModel
from xlabml.tokenizer import TokenizerTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VOCAB, MAX_LEN = 300, 24


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex bold jumping zebras".split()
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
    tokenizer = TokenizerTrainer().train(texts, N_VOCAB, tmp / "tok.model")
    torch.manual_seed(0)
    model = XLabModel(N_VOCAB, MAX_LEN, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0,
                      position="rope", n_kv_heads=2)
    # the layout of a training checkpoint: weights, model and data module hyperparameters
    ckpt = tmp / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"tokenizer_path": tokenizer.path, "seq_len": MAX_LEN,
                                                "num_tokens": N_VOCAB}, "pytorch-lightning_version": "2.6.6",
                "XLabDataModule": {"tokenizer_hash": tokenizer.content_hash, "tokenizer_path": tokenizer.path}},
               ckpt)
    bare = tmp / "bare.ckpt"  # no data settings (and, as before hashes were recorded, no tokenizer hash): needs -t
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, bare)
    flash = tmp / "flash.ckpt"  # trained with the flash_attn kernel
    torch.save({**torch.load(ckpt, weights_only=True), "hyper_parameters": {**model.hparams, "attention": "flash"}},
               flash)
    other = TokenizerTrainer().train([" ".join(reversed(t.split())) + " zebras hex" for t in texts], N_VOCAB,
                                     tmp / "other.model")  # same size, other merges
    return {"tmp": tmp, "ckpt": str(ckpt), "bare": str(bare), "flash": str(flash), "tokenizer": tokenizer,
            "other": other, "model": model.eval()}


def infer(capsys, *argv):
    """Runs main(argv); returns (exit code, stdout, stderr)."""
    try:
        infer_cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_text(files, prompt, strategy, *args, **kwargs):
    tok = files["tokenizer"]
    ids = [tok[tok.sos_token]] + tok.encode(prompt)
    excluded = [tok[tok.sos_token], tok[tok.pad_token]]
    new = strategy(files["model"], torch.tensor(ids), *args, MAX_LEN, eos_class=tok[tok.eos_token],
                   exclude_classes=excluded, **kwargs)
    return infer_cli.escape_control(tok.decode(ids + new.tolist()))


def test_greedy_and_beam_equal_the_library(files, capsys):
    code, out, err = infer(capsys, files["ckpt"], "the quick", "-g", "-l", 40, "--no-stream")
    assert (code, err) == (0, "")
    assert out == expected_text(files, "the quick", inference.greedy_search, 40) + "\n"
    assert out.startswith("the quick") and len(out) > len("the quick\n")  # 40 tokens pass MAX_LEN: it slides
    code, out, _ = infer(capsys, files["ckpt"], "the quick", "-b", "-w", 3, "-z", 0.5, "-l", 12)
    assert code == 0
    assert out == expected_text(files, "the quick", inference.beam_search, 3, 12, length_penalty=0.5) + "\n"


def test_window_options_equal_the_library(files, capsys, monkeypatch):
    """--context-keep and --rolling reach every strategy, which then gives the library's text."""
    cases = []
    for flag, kwargs in ((("--context-keep", 8), {"context_keep": 8}), (("--rolling",), {"rolling": True})):
        cases.append(((*flag, "-g", "-l", 40, "--no-stream"),
                      expected_text(files, "the quick", inference.greedy_search, 40, **kwargs)))
        cases.append(((*flag, "-l", 40, "-s", 3, "--stream"),
                      expected_text(files, "the quick", inference.sample, 40,
                                    generator=torch.Generator().manual_seed(3), **kwargs)))
        cases.append(((*flag, "-b", "-w", 2, "-l", 30),
                      expected_text(files, "the quick", inference.beam_search, 2, 30, **kwargs)))
    seen = []
    for name in ("sample", "beam_search", "generate_stream"):
        def spy(*args, _original=getattr(inference, name), **kwargs):
            seen.append((kwargs.get("context_keep"), kwargs.get("rolling")))
            return _original(*args, **kwargs)
        monkeypatch.setattr(inference, name, spy)
    for argv, expected in cases:
        code, out, err = infer(capsys, files["ckpt"], "the quick", *argv)
        assert (code, err, out) == (0, "", expected + "\n")
    assert seen == [(8, False)] * 3 + [(None, True)] * 3
    code, _, err = infer(capsys, files["ckpt"], "the quick", "--rolling", "--context-keep", 4)
    assert code == 2 and "not allowed with argument" in err and len(err.strip().splitlines()) == 1


def test_seeded_sampling_reproducible_streamed_or_not(files, capsys):
    args = (files["ckpt"], "a lazy", "-s", 7, "-l", 30, "-T", 0.9, "-k", 50, "-p", 0.95, "--min-p", 0.01,
            "--repetition-penalty", 1.1)
    code, plain, _ = infer(capsys, *args, "--no-stream")
    assert code == 0
    generator = torch.Generator().manual_seed(7)
    assert plain == expected_text(files, "a lazy", inference.sample, 30, temperature=0.9, top_k=50, top_p=0.95,
                                  min_p=0.01, repetition_penalty=1.1, generator=generator) + "\n"
    assert infer(capsys, *args, "--stream")[1] == plain
    assert infer(capsys, *args, "--no-stream")[1] == plain
    code, two, _ = infer(capsys, *args, "-n", 2, "--no-stream")
    runs = two.split(infer_cli.SEPARATOR + "\n")
    assert code == 0 and len(runs) == 2 and runs[0] == plain and runs[1] != plain


def test_prompt_from_file_stdin_and_continued(files, capsys, monkeypatch):
    path = files["tmp"] / "prompt.txt"
    path.write_text("seven wizards", encoding="utf-8")
    direct = infer(capsys, files["ckpt"], "seven wizards", "-g", "-l", 8)[1]
    assert infer(capsys, files["ckpt"], f"FILE:{path}", "-g", "-l", 8)[1] == direct
    monkeypatch.setattr(sys, "stdin", io.StringIO("seven wizards"))
    assert infer(capsys, files["ckpt"], "-", "-g", "-l", 8)[1] == direct
    tok = files["tokenizer"]
    ids = tok.encode("seven wizards")  # -c: no <sos> before the prompt
    new = inference.greedy_search(files["model"], torch.tensor(ids), 8, MAX_LEN, eos_class=2, exclude_classes=[1, 3])
    continued = infer_cli.escape_control(tok.decode(ids + new.tolist())) + "\n"
    assert infer(capsys, files["ckpt"], "seven wizards", "-c", "-g", "-l", 8)[1] == continued


def test_control_characters_are_escaped(files, capsys):
    assert infer_cli.escape_control("a\tb\nc\x1b[31m\rd\x7f\x00") == "a\tb\nc\\x1b[31m\\rd\\x7f\\x00"
    code, out, _ = infer(capsys, files["ckpt"], "red \x1b[31m fox\r", "-g", "-l", 3)
    assert code == 0 and "\x1b" not in out and "\r" not in out
    assert out.startswith("red \\x1b[31m fox\\r")


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_exports_and_explicit_tokenizer(files, capsys, fmt):
    reference = infer(capsys, files["ckpt"], "the lazy", "-g", "-l", 10)[1]
    exported, _ = export_checkpoint(files["ckpt"], files["tmp"] / "exports", format=fmt)
    assert exported.suffix == "." + fmt
    assert infer(capsys, exported, "the lazy", "-g", "-l", 10)[1] == reference  # tokenizer from the stored data
    with pytest.warns(CheckpointWarning, match="bare.ckpt records no tokenizer hash"):  # an old checkpoint
        assert infer(capsys, files["bare"], "the lazy", "-g", "-l", 10, "-t", files["tokenizer"].path)[1] == reference


def test_a_different_tokenizer_of_the_same_size_is_refused(files, capsys):
    ours, other = files["tokenizer"], files["other"]
    assert len(other) == len(ours) == N_VOCAB and other.content_hash != ours.content_hash
    code, out, err = infer(capsys, files["ckpt"], "the lazy", "-g", "-t", other.path)
    assert (code, out) == (1, "")  # before: it decoded the model's ids with the other vocabulary, silently
    assert err == (f"xlab-infer: error: tokenizer {other.path} (content hash {other.content_hash}) is not the "
                   f"model's tokenizer: checkpoint {files['ckpt']} was trained with {ours.path} (content hash "
                   f"{ours.content_hash})\n")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_checkpoint_generates_here_with_sdpa(files, capsys):
    reference = infer(capsys, files["ckpt"], "the lazy", "-g", "-l", 10)[1]
    with pytest.warns(CheckpointWarning, match="attention='flash' but the flash_attn package is not installed"):
        code, out, err = infer(capsys, files["flash"], "the lazy", "-g", "-l", 10)
    assert (code, out) == (0, reference)  # before: "attention='flash' needs the flash_attn package"


@pytest.mark.slow
def test_script_prints_a_warning_as_one_line(files):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), files["bare"], "the", "-g", "-l", "3",
                             "-t", files["tokenizer"].path], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("the")
    assert result.stderr == (f"xlab-infer: warning: checkpoint {files['bare']} records no tokenizer hash (written by "
                             f"an older xlabml): cannot check that tokenizer {files['tokenizer'].path} is the one it "
                             "was trained with\n")


def test_errors_are_one_line_and_non_zero(files, capsys, tmp_path):
    big = TokenizerTrainer().train([" ".join(f"w{i}" for i in range(400))] * 3, N_VOCAB + 50, tmp_path / "big.model")
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    cases = [
        ((tmp_path / "missing.ckpt", "x"), "not found"),
        ((files["ckpt"], "x", "-g", "-b"), "exclude each other"),
        ((files["ckpt"], "x", "-t", big.path), "not the model's tokenizer"),
        ((files["ckpt"], "x", "-t", empty), "not a valid SentencePiece"),
        ((files["ckpt"], "x", "-t", tmp_path / "nope.model"), "not found"),
        ((files["bare"], "x"), "-t/--tokenizer"),
        ((files["ckpt"], "", "-c"), "empty prompt"),
        ((files["ckpt"], f"FILE:{tmp_path / 'none.txt'}"), "not found"),
        ((empty, "x"), "not a loadable checkpoint"),
        ((files["ckpt"], "x", "-l", 0), "-l/--limit"),
        ((files["ckpt"], "x", "-p", 1.5), "-p/--top-p"),
        ((files["ckpt"], "x", "-T", -1), "-T/--temperature"),
        ((files["ckpt"], "x", "-k", "two"), "-k/--top-k"),
        ((files["ckpt"], "x", "-d", "tpu"), "-d/--device"),
    ]
    for argv, message in cases:
        code, out, err = infer(capsys, *argv)
        assert code != 0, argv
        assert err.count("\n") == 1 and err.startswith("xlab-infer: error:") and message in err, (argv, err)
        assert out == ""


def test_script_error_is_one_line_without_traceback(files):
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), files["ckpt"] + ".missing", "the"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == f"xlab-infer: error: checkpoint {files['ckpt']}.missing not found\n"


@pytest.mark.slow
def test_script_runs_as_a_command(files):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), files["ckpt"], "the", "-g", "-l", "5"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("the") and ok.stderr == ""


def test_last_means_the_newest_last_checkpoint_under_logs(files, capsys, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    code, _, err = infer(capsys, "last", "the quick", "-g")
    assert code == 1 and "no last.ckpt found" in err and err.count("\n") == 1
    old = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    new = tmp_path / "logs" / "version_1" / "checkpoints" / "last.ckpt"
    for path in (old, new):
        path.parent.mkdir(parents=True)
    old.write_bytes(b"not a checkpoint")  # would fail to load: picking it is an error
    shutil.copy(files["ckpt"], new)
    os.utime(old, (1_000_000, 1_000_000))  # older, whatever the file system's time resolution
    from xlabml.cli import find_last_checkpoint

    assert find_last_checkpoint() == str(new.relative_to(tmp_path))
    code, out, err = infer(capsys, "last", "the quick", "-g", "-l", 10, "--no-stream")
    assert (code, err) == (0, "")
    assert out == expected_text(files, "the quick", inference.greedy_search, 10) + "\n"


def test_dtype_casts_the_model_and_equals_the_library(files, capsys):
    assert infer(capsys, files["ckpt"], "the quick", "-g", "-l", 20, "--dtype", "fp32")[1] == infer(
        capsys, files["ckpt"], "the quick", "-g", "-l", 20)[1]  # auto on a CPU is fp32
    code, out, err = infer(capsys, files["ckpt"], "the quick", "-g", "-l", 20, "--dtype", "bf16", "--no-stream")
    assert (code, err) == (0, "")
    half = dict(files, model=XLabModel(**files["model"].hparams).to(torch.bfloat16).eval())
    half["model"].load_state_dict(files["model"].state_dict())
    assert out == expected_text(half, "the quick", inference.greedy_search, 20) + "\n"
    code, _, err = infer(capsys, files["ckpt"], "x", "--dtype", "fp8")
    assert code != 0 and "--dtype" in err
