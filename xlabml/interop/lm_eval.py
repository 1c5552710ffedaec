"""The ``xlab`` model of lm-evaluation-harness: evaluate an XLab checkpoint on any lm-eval task.

    python -m xlabml.interop.lm_eval --model xlab --model_args pretrained=CKPT --device cpu --batch_size 16 --tasks ...
    ./manage.py evaluate CKPT --tasks hellaswag,arc_easy [--device cuda] [--batch-size 16]

lm-eval finds models only in its own registry, so the ``xlab`` name exists once this module is imported: the
``python -m`` form above imports it and then runs lm-eval's command line unchanged (whose ``--device`` defaults
to ``cuda:0``: give ``--device cpu`` on a CPU); in Python, ``import xlabml.interop.lm_eval`` before
``lm_eval.simple_evaluate(model="xlab", ...)``, or pass ``XLabLM(...)`` itself.

Every scored or generated sequence starts with ``<sos>``, as the training documents do. ``loglikelihood`` and
``loglikelihood_rolling`` run batches of up to ``batch_size`` sequences (longest first, right-padded, one forward
each); ``generate_until`` generates for up to ``batch_size`` prompts at once with the KV cache
(``xlabml.inference``), in rounds of ``chunk`` tokens, dropping a row once its text holds a stop string (its
output is cut there) or it has produced ``<eos>``.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from . import require

lm_eval = require("lm_eval", "eval")
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import model_registry  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu")
    return name


class XLabLM(TemplateLM):
    """An XLab checkpoint as an lm-eval model.

    Args:
        pretrained: a training checkpoint or an export (``.ckpt``, or ``.safetensors`` beside its ``.json``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (default).
        batch_size: sequences per forward (default 1).
        tokenizer: the tokenizer model file (default: the one the checkpoint's data settings name).
        max_length: the longest context scored or kept (default and upper bound: the model's ``max_len``).
        chunk: tokens generated per round of ``generate_until`` between stop-string checks (default 32).
        max_batch_size: accepted for lm-eval's command line, unused (``batch_size=auto`` means 16).
    """

    backend = "causal"

    def __init__(self, pretrained: str, device: str = "auto", batch_size: int | str = 1,
                 tokenizer: str | None = None, max_length: int | None = None, chunk: int = 32,
                 max_batch_size: int | None = None, **unknown):
        super().__init__()
        if unknown:  # lm-eval passes model_args through: a typo must not be ignored silently
            raise ValueError(f"unknown xlab model_args {', '.join(sorted(unknown))}; expected pretrained, device, "
                             "batch_size, tokenizer, max_length, chunk")
        from . import load_model

        if str(batch_size).startswith("auto"):
            batch_size = 16  # no memory probing: a fixed batch that suits a CPU and a small GPU model
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected an integer >= 1")
        self._device = torch.device(_device(str(device)))
        loaded = load_model(pretrained, str(self._device), tokenizer=tokenizer)
        self.model, self.xlab_tokenizer = loaded.model, loaded.tokenizer
        self.n_vocab = loaded.hparams["n_vocab"]
        block = self.model.hparams["max_len"]
        self._max_length = block if max_length is None else min(int(max_length), block)
        self.chunk = int(chunk)
        self.pretrained = str(pretrained)

    # ---------------------------------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.xlab_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.xlab_tokenizer.sos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "xlab-" + self.xlab_tokenizer.content_hash

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """XLab's ids of ``string``, after ``<sos>`` unless ``add_special_tokens`` is False."""
        ids = self.xlab_tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.prefix_token_id] + ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.xlab_tokenizer.decode(ids)

    def _excluded(self) -> list[int]:
        from .hf import excluded_ids

        return excluded_ids(self.xlab_tokenizer, self.n_vocab)

    # -------------------------------------------------------------------------------------- scoring

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability of ``continuation``, whether greedy decoding gives it) for each (context,
        continuation) pair of id lists; the sequence is cut on the left to ``max_length + 1`` tokens."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                results[i] = (0.0, True)
                continue
            tokens = (context + continuation)[-(self.max_length + 1):]
            rows.append((i, tokens[:-1], len(continuation), tokens[-len(continuation):]))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths share a batch: less padding
        pad = self.xlab_tokenizer.pad_id
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = len(batch[0][1])
            x = torch.full((len(batch), width), pad, dtype=torch.long)
            for j, (_, inputs, _, _) in enumerate(batch):
                x[j, :len(inputs)] = torch.tensor(inputs)  # right padding: causal, so pads change nothing before them
            logprobs = F.log_softmax(self.model(x.to(self._device)).float(), dim=-1)  # b t v
            for j, (i, inputs, n, target) in enumerate(batch):
                n = min(n, len(inputs))
                lp = logprobs[j, len(inputs) - n:len(inputs)]  # n v: predictions of the continuation
                target_t = torch.tensor(target[-n:], device=lp.device)
                score = lp.gather(-1, target_t[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target_t).all())
                results[i] = (score, greedy)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = self._score(pairs)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: windows of ``max_length`` tokens, each token predicted once with as
        much context as fits (lm-eval's rolling windows), the first one after ``<sos>``."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._score(windows)):
            totals[owner] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ----------------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``/``temperature``) continuations, cut before the first stop
        string of ``until``; at most ``max_gen_toks`` tokens (default 256)."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sampling = self._sampling(kwargs)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch], until, max_new, sampling)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    @staticmethod
    def _sampling(kwargs: dict) -> dict:
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        sampling = {"temperature": temperature if do_sample else 0.0}
        if do_sample and kwargs.get("top_k") is not None:
            sampling["top_k"] = int(kwargs["top_k"])
        if do_sample and kwargs.get("top_p") is not None:
            sampling["top_p"] = float(kwargs["top_p"])
        return sampling

    def _generate(self, contexts: list[str], until: list[str], max_new: int, sampling: dict) -> list[str]:
        from xlabml import inference

        prompts = [self.tok_encode(c) for c in contexts]
        generated: list[list[int]] = [[] for _ in contexts]
        done = [max_new <= 0] * len(contexts)
        outputs = [""] * len(contexts)
        eos = self.eot_token_id
        while not all(done):
            live = [i for i, d in enumerate(done) if not d]
            step = min(self.chunk, min(max_new - len(generated[i]) for i in live))
            batch = [torch.tensor(prompts[i] + generated[i]) for i in live]
            new = inference.sample(self.model, batch, step, self.max_length, eos_class=eos,
                                   exclude_classes=self._excluded(), **sampling)
            for i, tokens in zip(live, new):
                tokens = tokens.tolist()
                generated[i] += tokens
                text = self.tok_decode(generated[i])
                cut = min((text.find(s) for s in until if s and s in text), default=-1)
                if cut >= 0:
                    outputs[i], done[i] = text[:cut], True
                elif len(tokens) < step or len(generated[i]) >= max_new:  # <eos>, or the token budget spent
                    outputs[i], done[i] = text, True
        return outputs


# By module path, not by class: `python -m` runs this file as __main__ too, and both copies register the same name.
model_registry.register("xlab", target="xlabml.interop.lm_eval:XLabLM")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``xlab`` model registered (``python -m xlabml.interop.lm_eval ...``)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


def evaluate(checkpoint: str, tasks: list[str], *, device: str = "auto", batch_size: int = 1,
             num_fewshot: int | None = None, limit: float | None = None, include_path: str | None = None,
             tokenizer: str | None = None, include_defaults: bool = True, seed: int = 0) -> dict:
    """Run lm-eval ``tasks`` on ``checkpoint``; returns lm-eval's results dict (``results``, ``configs``, ...).
    ``include_path``: a directory of task YAMLs added to lm-eval's (``include_defaults=False``: only those)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model = XLabLM(checkpoint, device=device, batch_size=batch_size, tokenizer=tokenizer)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks`"
                         + ("" if include_path else " (or give --include-path DIR for local task YAMLs)"))
    return simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


if __name__ == "__main__":
    main()
