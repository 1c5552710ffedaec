"""The xlab model of lm-evaluation-harness: its scores equal a direct computation from the model's logits, batched
or not; generate_until stops at the given strings; a local task (YAML + JSON under tmp_path) runs end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from interop_support import make_checkpoint, train_tokenizer  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from xlabml import inference  # noqa: E402
from xlabml.interop.lm_eval import XLabLM, evaluate  # noqa: E402
from xlabml.manage import main  # noqa: E402

MAX_LEN = 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = train_tokenizer(root)
    ckpt, model = make_checkpoint(root / "model.ckpt", tokenizer.path, max_len=MAX_LEN, seed=1,
                                  position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2)
    return tokenizer, ckpt, model.eval()


def _instances(kind, args):
    return [Instance(kind, {}, a, i, ("t", i, 1)) for i, a in enumerate(args)]


def _direct(model, tokenizer, context, continuation):
    """log p(continuation | <sos> context), split into tokens as lm-eval does (trailing spaces of the context move to
    the continuation; encode the whole, cut at the context's length), the sequence cut on the left to the model's
    context."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context)) if context else 0
    ids = [tokenizer.sos_id] + whole
    target = ids[1 + n_context:]
    ids = ids[-(MAX_LEN + 1):]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)[-len(target):]
    return float(logprobs[torch.arange(len(target)), torch.tensor(target)].sum())


PAIRS = [("def add(a, b):\n    return", " a + b"), ("import", " os"), ("", "print('hello')"),
         ("x" * 40 + " = ", "[1, 2, 3]"), ("The Python language", " is great.\n" * 6)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_equals_direct_computation(setup, batch_size):
    tokenizer, ckpt, model = setup
    lm = XLabLM(str(ckpt), device="cpu", batch_size=batch_size)
    results = lm.loglikelihood(_instances("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(PAIRS, results):
        assert score == pytest.approx(_direct(model, tokenizer, context, continuation), abs=1e-4)
        assert score < 0 and greedy is False
    # a continuation that is the model's own greedy choice is reported as greedy
    prompt = [tokenizer.sos_id] + tokenizer.encode("def f(x):")
    best = inference.greedy_search(model, torch.tensor(prompt), 3, MAX_LEN).tolist()
    (_, greedy), = lm._score([(prompt, best)])
    assert greedy is True


def test_loglikelihood_rolling_scores_each_token_once(setup):
    tokenizer, ckpt, model = setup
    lm = XLabLM(str(ckpt), device="cpu", batch_size=2)
    short, long = "x = 1\n", "for i in range(10):\n    print(i, i * i)\n" * 6
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(short,), (long,)]), disable_tqdm=True)
    assert got[0] == pytest.approx(_direct(model, tokenizer, "", short), abs=1e-4)
    # longer than the context: windows of MAX_LEN inputs; the first after <sos>, each later one predicts the next
    # MAX_LEN tokens from the MAX_LEN tokens before its last prediction
    tokens = tokenizer.encode(long)
    assert len(tokens) > 2 * MAX_LEN
    sequence = [tokenizer.sos_id] + tokens
    expected, done = 0.0, 0
    while done < len(tokens):
        end = min(done + MAX_LEN, len(tokens))
        start = max(0, end - MAX_LEN)  # inputs sequence[start:end] predict sequence[start + 1:end + 1]
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([sequence[start:end]]))[0], -1)
        targets = torch.tensor(sequence[start + 1:end + 1])
        scored = slice(done - start, end - start)  # only the tokens not scored before
        expected += float(logprobs[scored].gather(-1, targets[scored, None]).sum())
        done = end
    assert got[1] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("batch_size,chunk", [(1, 32), (3, 5)])
def test_generate_until_stops_at_the_strings(setup, batch_size, chunk):
    tokenizer, ckpt, model = setup
    lm = XLabLM(str(ckpt), device="cpu", batch_size=batch_size, chunk=chunk)
    contexts = ["def main():", "import os\n", "class A:"]
    full = []
    for context in contexts:
        ids = inference.greedy_search(model, torch.tensor([tokenizer.sos_id] + tokenizer.encode(context)), 30,
                                      MAX_LEN, eos_class=tokenizer.eos_id, exclude_classes=lm._excluded())
        full.append(tokenizer.decode(ids.tolist()))
    stops = [text[3:6] for text in full]  # strings the greedy continuations do contain
    requests = [(c, {"until": [s, "never appears \u2047"], "max_gen_toks": 30}) for c, s in zip(contexts, stops)]
    requests.append((contexts[0], {"until": [], "max_gen_toks": 30}))
    got = lm.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    for text, stop, out in zip(full, stops, got):
        assert out == text[:text.index(stop)] and stop not in out
    assert got[3] == full[0]  # no stop string: the whole budget (or up to <eos>)


def _write_tasks(directory, data):
    (directory / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / 'data.jsonl'}\n"
              "test_split: test\n")
    (directory / "mc.yaml").write_text(
        "task: xlab_test_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (directory / "roll.yaml").write_text(
        "task: xlab_test_roll\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")


DATA = [{"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0,
         "text": "import os\nprint(os.getcwd())\n"},
        {"question": "for i in", "choices": ["range(10):", "list", "x y z"], "answer": 1,
         "text": "class A:\n    pass\n"},
        {"question": "x =", "choices": ["1", "2"], "answer": 1, "text": "while True:\n    break\n"}]


def test_local_tasks_end_to_end(setup, tmp_path, capsys):
    tokenizer, ckpt, model = setup
    _write_tasks(tmp_path, DATA)
    results = evaluate(str(ckpt), ["xlab_test_mc", "xlab_test_roll"], device="cpu", batch_size=4,
                       include_path=str(tmp_path), include_defaults=False)["results"]
    # accuracy: the choice of highest log-likelihood, from the logits directly
    # (lm-eval scores " " + choice after the question: its default target delimiter)
    correct = [max(range(len(d["choices"])),
                   key=lambda c: _direct(model, tokenizer, d["question"], " " + d["choices"][c])) == d["answer"]
               for d in DATA]
    assert results["xlab_test_mc"]["acc,none"] == pytest.approx(sum(correct) / len(DATA))
    nll = -sum(_direct(model, tokenizer, "", d["text"]) for d in DATA)
    n_bytes = sum(len(d["text"].encode()) for d in DATA)
    assert results["xlab_test_roll"]["bits_per_byte,none"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    # the same through ./manage.py evaluate, which writes the results once
    out = tmp_path / "results.json"
    argv = ["evaluate", str(ckpt), "--tasks", "xlab_test_mc", "--include-path", str(tmp_path), "--no-builtin-tasks",
            "--device", "cpu", "-o", str(out)]
    main(argv)
    printed = capsys.readouterr().out
    assert "xlab_test_mc" in printed and f"wrote {out}" in printed
    assert json.loads(out.read_text())["results"]["xlab_test_mc"]["acc,none"] == pytest.approx(sum(correct) / len(DATA))
    with pytest.raises(SystemExit):
        main(argv)
    assert "already exists" in capsys.readouterr().err


def test_bad_arguments_are_one_line(setup, tmp_path, capsys):
    _, ckpt, _ = setup
    for argv, message in ((["--tasks", "no_such_task_xyz", "--include-path", str(tmp_path), "--no-builtin-tasks"],
                           "unknown lm-eval task(s) no_such_task_xyz"),
                          (["--tasks", "x", "--no-builtin-tasks"], "--no-builtin-tasks needs --include-path")):
        with pytest.raises(SystemExit):
            main(["evaluate", str(ckpt), "--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    with pytest.raises(ValueError, match="batch_size=0"):
        XLabLM(str(ckpt), batch_size=0)
