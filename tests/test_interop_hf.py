"""export-hf / import-hf: the exported model computes XLab's logits and greedy continuations, loaded by transformers
itself (stock classes without trust_remote_code); imports of random local Llama/GPT-2 models compute theirs."""
import itertools
import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from interop_support import N_VOCAB, TINY, excluded, make_checkpoint, randomize, train_tokenizer  # noqa: E402

from xlabml import inference  # noqa: E402
from xlabml.checkpoints import export_checkpoint, load_checkpoint  # noqa: E402
from xlabml.interop.hf import STOCK, export_hf, import_hf  # noqa: E402
from xlabml.manage import main  # noqa: E402

# ------------------------------------------------------------------------------------------ the variants swept

OPTIONS = {
    "position": ["sinusoidal", "learned", "rope", "alibi", "none"],
    "norm": ["layernorm", "rmsnorm"],
    "ffn": ["gelu", "relu", "swiglu"],
    "n_kv_heads": [4, 2],
    "tie_embeddings": [False, True],
    "parallel_residual": [False, True],
    "qk_norm": [False, True],
    "sliding_window": [None, 4],
    "prenorm": [True, False],
    "bias": [True, False],
    "embedding_scale": [None, 1.0],
    "rope_fraction": [1.0, 0.5],
    "final_norm": [True, False],
}


def pairwise(options: dict, seed: int = 0, candidates: int = 40) -> list[dict]:
    """A covering array of strength 2: every value of every option appears with every value of every other option
    in some row (greedy construction, deterministic for a seed)."""
    names = list(options)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2)
                 for x in options[a] for y in options[b]}
    rng = random.Random(seed)
    rows = []
    while uncovered:
        best, best_gain = None, -1
        pairs = sorted(uncovered, key=repr)
        for _ in range(candidates):
            a, b = rng.choice(pairs)  # a row through one uncovered pair
            row = {n: rng.choice(options[n]) for n in names}
            row[a[0]], row[b[0]] = a[1], b[1]
            gain = sum(((p, row[p]), (q, row[q])) in uncovered for p, q in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append(best)
        uncovered -= {((p, best[p]), (q, best[q])) for p, q in itertools.combinations(names, 2)}
    return rows


SWEEP = pairwise(OPTIONS)

# exactly the stock layouts (and the modern preset with bias: false), with the class each must export as
STOCK_CASES = {
    "modern": (dict(position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, tie_embeddings=True,
                    embedding_scale=1.0, bias=False), "LlamaForCausalLM"),
    "llama-untied-scaled": (dict(position="rope", norm="rmsnorm", ffn="swiglu", bias=False), "LlamaForCausalLM"),
    "llama-biases": (dict(position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, embedding_scale=1.0,
                          zero=("head.bias",)), "LlamaForCausalLM"),
    "mistral-zero-biases": (dict(position="rope", norm="rmsnorm", ffn="swiglu", sliding_window=3, embedding_scale=1.0,
                                 zero=("bias",)), "MistralForCausalLM"),
    "mistral": (dict(position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, sliding_window=5, bias=False,
                     embedding_scale=1.0), "MistralForCausalLM"),
    "qwen3": (dict(position="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=1, qk_norm=True, bias=False,
                   embedding_scale=1.0, tie_embeddings=True), "Qwen3ForCausalLM"),
    "gpt2": (dict(position="learned", bias=False, embedding_scale=1.0, tie_embeddings=True), "GPT2LMHeadModel"),
    "gpt2-relu": (dict(position="learned", ffn="relu", bias=False), "GPT2LMHeadModel"),
    "gpt2-biases": (dict(position="learned", embedding_scale=1.0, zero=("head.bias",)), "GPT2LMHeadModel"),
    "neox-parallel": (dict(position="rope", rope_fraction=0.25, parallel_residual=True, bias=False),
                      "GPTNeoXForCausalLM"),
    "neox-tied": (dict(position="rope", rope_fraction=0.5, tie_embeddings=True, embedding_scale=1.0, bias=False),
                  "GPTNeoXForCausalLM"),
    "neox-biases": (dict(position="rope", rope_fraction=0.25, parallel_residual=True, zero=("head.bias",)),
                    "GPTNeoXForCausalLM"),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def _export(tmp_path, tokenizer, seed=0, **arch):
    ckpt, model = make_checkpoint(tmp_path / "model.ckpt", tokenizer.path, seed=seed, **arch)
    outdir, cls, reasons = export_hf(ckpt, tmp_path / "hf")
    return model, outdir, cls, reasons


def _load(outdir, cls):
    """Stock classes load without trust_remote_code (and the directory holds no code)."""
    stock = cls != "XLabForCausalLM"
    assert stock == (not list(outdir.glob("*.py")))
    model = transformers.AutoModelForCausalLM.from_pretrained(outdir, **({} if stock else {"trust_remote_code": True}))
    assert type(model).__name__ == cls
    return model.eval()


def _assert_parity(model, hf, tokenizer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, N_VOCAB, (2, 24), generator=generator)
    with torch.no_grad():
        expected, got = model(x), hf(input_ids=x).logits
    assert (expected - got).abs().max() < 1e-5
    prompt = torch.cat([torch.tensor([tokenizer.sos_id]), torch.randint(4, len(tokenizer), (6,), generator=generator)])
    ours = inference.greedy_search(model, prompt, 32, TINY["max_len"], eos_class=tokenizer.eos_id,
                                   exclude_classes=excluded(tokenizer))
    # generation_config.json's suppress_tokens and eos are xlab-infer's exclusions and <eos>
    theirs = hf.generate(prompt[None], max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    if theirs[-1:] == [tokenizer.eos_id]:
        theirs = theirs[:-1]
    # the test means something only if the greedy choices are not near ties
    path = torch.cat([prompt, ours])[None]
    with torch.no_grad():
        top2 = model(path)[0, len(prompt) - 1:-1].index_fill(-1, torch.tensor(excluded(tokenizer)), -1e9).topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4
    assert theirs == ours.tolist()


@pytest.mark.parametrize("name", STOCK_CASES)
def test_stock_classes_compute_xlab(tmp_path, tokenizer, name):
    arch, cls = STOCK_CASES[name]
    model, outdir, got_cls, reasons = _export(tmp_path, tokenizer, **arch)
    assert got_cls == cls and reasons == {}
    _assert_parity(model, _load(outdir, cls), tokenizer)
    # whatever tokenizer class transformers associates with the model type, the export's own is used
    tok = transformers.AutoTokenizer.from_pretrained(outdir)
    text = "def f(x):\n    return x  \u2581 \ue000u <eos>"
    assert tok(text).input_ids == [tokenizer.sos_id] + tokenizer.encode(text)
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("index", range(len(SWEEP)), ids=lambda i: "-".join(
    str(v) for v in SWEEP[i].values()).replace("None", "-"))
def test_pairwise_variants_compute_xlab(tmp_path, tokenizer, index):
    model, outdir, cls, reasons = _export(tmp_path, tokenizer, seed=index, **SWEEP[index])
    _assert_parity(model, _load(outdir, cls), tokenizer, seed=index)


def test_sweep_covers_every_pair():
    for a, b in itertools.combinations(OPTIONS, 2):
        for x, y in itertools.product(OPTIONS[a], OPTIONS[b]):
            assert any(row[a] == x and row[b] == y for row in SWEEP), (a, x, b, y)
    assert len(SWEEP) <= 30


def test_custom_export_says_why_and_pads(tmp_path, tokenizer):
    # the release default (sinusoidal positions, head bias) is no stock class; left-padded batches generate as
    # each prompt alone does
    model, outdir, cls, reasons = _export(tmp_path, tokenizer, seed=3)
    assert cls == "XLabForCausalLM" and set(reasons) == {c for c, *_ in STOCK.values()}
    assert reasons["LlamaForCausalLM"] == "position='sinusoidal'"
    hf = _load(outdir, cls)
    tok = transformers.AutoTokenizer.from_pretrained(outdir, trust_remote_code=True)
    tok.padding_side = "left"
    texts = ["def f(x):", "import os\nprint(os.getcwd())"]
    batch = tok(texts, return_tensors="pt", padding=True)
    out = hf.generate(**batch, max_new_tokens=12, do_sample=False)[:, batch.input_ids.shape[1]:]
    for text, row in zip(texts, out):
        alone = inference.greedy_search(model, torch.tensor(tok(text).input_ids), 12, TINY["max_len"],
                                        exclude_classes=excluded(tokenizer))
        assert row.tolist()[:len(alone)] == alone.tolist()


def test_directory_contents_and_model_card(tmp_path, tokenizer):
    run = tmp_path / "logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  d_model: 32\n")
    callbacks = {"ModelCheckpoint{'monitor': 'val_loss'}": {"monitor": "val_loss", "current_score": torch.tensor(2.5),
                                                            "best_model_score": torch.tensor(2.25)}}
    ckpt, _ = make_checkpoint(run / "checkpoints" / "last.ckpt", tokenizer.path, extra={"callbacks": callbacks},
                              **STOCK_CASES["modern"][0])
    outdir, cls, _ = export_hf(ckpt, tmp_path / "out")
    assert sorted(p.name for p in outdir.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert not list(tmp_path.glob(".out.*"))  # the temporary directory was renamed, nothing left behind
    generation = json.loads((outdir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)
    assert generation["suppress_tokens"] == excluded(tokenizer)
    config = json.loads((outdir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["xlab"]["hyper_parameters"]["d_model"] == 32
    card = (outdir / "README.md").read_text()
    assert "- val_loss: 2.5" in card and "(step 10)" in card
    assert '"position": "rope"' in card and "d_model: 32" in card  # the training config and the run's config.yaml
    assert open(tokenizer.path, "rb").read() == (outdir / "tokenizer.model").read_bytes()


def test_safetensors_export_and_cli(tmp_path, tokenizer, capsys):
    ckpt, model = make_checkpoint(tmp_path / "model.ckpt", tokenizer.path, **STOCK_CASES["gpt2"][0])
    slim, _ = export_checkpoint(ckpt, tmp_path / "exports", format="safetensors")
    main(["export-hf", str(slim), str(tmp_path / "hf")])
    assert "as GPT2LMHeadModel (a stock transformers class" in capsys.readouterr().out
    hf = _load(tmp_path / "hf", "GPT2LMHeadModel")
    x = torch.randint(0, N_VOCAB, (1, 16))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - model.eval()(x)).abs().max() < 1e-5
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["export-hf", str(ckpt), str(tmp_path / "hf")])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; refusing to overwrite" in err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before


def test_wrong_tokenizer_is_one_line(tmp_path, tokenizer, capsys):
    # the checkpoint records its tokenizer's content hash; another tokenizer is refused before anything is written
    from xlabml.corpus import iter_builtin_texts
    from xlabml.tokenizer import TokenizerTrainer

    ckpt, _ = make_checkpoint(tmp_path / "model.ckpt", tokenizer.path)
    other = TokenizerTrainer({"num_threads": 1}).train(list(iter_builtin_texts("python-topics"))[:10], 600,
                                                       tmp_path / "other.model")
    with pytest.raises(SystemExit):
        main(["export-hf", str(ckpt), str(tmp_path / "hf"), "-t", other.path])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the model's tokenizer" in err
    assert not (tmp_path / "hf").exists()


def test_missing_tokenizer_is_one_line(tmp_path, tokenizer, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "model.ckpt", tmp_path / "gone.model")
    with pytest.raises(SystemExit):
        main(["export-hf", str(ckpt), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gone.model" in err and "not found" in err
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------------------------------- import

def _random_hf(directory, config, cls, seed=0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(directory)
    return model


LLAMA = dict(vocab_size=N_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-5)
GPT2 = dict(vocab_size=N_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, activation_function="gelu")


@pytest.mark.parametrize("name,config,cls", [
    ("llama-gqa", transformers.LlamaConfig(**LLAMA, num_key_value_heads=2), transformers.LlamaForCausalLM),
    ("llama-bias-tied", transformers.LlamaConfig(**LLAMA, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
     transformers.LlamaForCausalLM),
    ("gpt2", transformers.GPT2Config(**GPT2), transformers.GPT2LMHeadModel),
    ("gpt2-untied", transformers.GPT2Config(**GPT2, n_inner=48, tie_word_embeddings=False),
     transformers.GPT2LMHeadModel),
])
def test_import_computes_the_hf_model(tmp_path, tokenizer, name, config, cls):
    hf = _random_hf(tmp_path / "hf", config, cls)
    out, tok_path, notes = import_hf(tmp_path / "hf", tmp_path / "imported.ckpt", tokenizer=tokenizer.path)
    assert notes == [] and tok_path == str(tmp_path / "imported.tokenizer.model")
    loaded = load_checkpoint(out, tokenizer=False)
    model, data = loaded.model.eval(), loaded.data_hparams
    assert data["tokenizer_path"] == str((tmp_path / "imported.tokenizer.model").resolve())
    assert load_checkpoint(out).tokenizer.content_hash == tokenizer.content_hash  # recorded, and checked
    x = torch.randint(0, N_VOCAB, (2, 24))
    with torch.no_grad():
        assert (model(x) - hf(input_ids=x).logits).abs().max() < 1e-5
    prompt = torch.randint(4, len(tokenizer), (5,))
    ours = inference.greedy_search(model, prompt, 16, 64)
    hf.generation_config.eos_token_id = None  # 16 tokens, as greedy_search without eos_class
    assert hf.generate(prompt[None], max_new_tokens=16, do_sample=False)[0, 5:].tolist() == ours.tolist()
    # and back: the same stock class, the same weights
    outdir, back, _ = export_hf(out, tmp_path / "back")
    assert back == cls.__name__
    again = cls.from_pretrained(outdir)
    for key, value in hf.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_import_infers_and_refuses_clearly(tmp_path, tokenizer, capsys):
    from xlabml.infer_cli import main as infer

    _random_hf(tmp_path / "gpt2", transformers.GPT2Config(**{**GPT2, "activation_function": "gelu_new"}),
               transformers.GPT2LMHeadModel)
    with pytest.raises(ValueError, match="activation_function='gelu_new'.*--approximate"):
        import_hf(tmp_path / "gpt2", tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists()
    main(["import-hf", str(tmp_path / "gpt2"), str(tmp_path / "a.ckpt"), "--approximate"])
    out = capsys.readouterr().out
    assert "approximation: activation_function='gelu_new'" in out and "no XLab tokenizer" in out
    from xlabml.checkpoints import CheckpointWarning

    with pytest.warns(CheckpointWarning, match="records no tokenizer hash"):  # weights only: nothing to check
        infer([str(tmp_path / "a.ckpt"), "def", "-g", "-l", "4", "-t", str(tokenizer.path)])
    assert capsys.readouterr().out.startswith("def")
    # a model directory of another architecture, and a missing one: one line each
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    for source in ("other", "nowhere"):
        with pytest.raises(SystemExit):
            main(["import-hf", str(tmp_path / source), str(tmp_path / "b.ckpt")])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("MambaForCausalLM; import-hf reads" in err or "not found" in err)
    assert not (tmp_path / "b.ckpt").exists()


def test_custom_export_imports_back(tmp_path, tokenizer):
    model, outdir, cls, _ = _export(tmp_path, tokenizer, seed=5, position="alibi", prenorm=False, tie_embeddings=True)
    assert cls == "XLabForCausalLM"
    out, tok_path, _ = import_hf(outdir, tmp_path / "back.ckpt")  # the export's tokenizer.model is XLab's
    back = load_checkpoint(out).model
    assert open(tok_path, "rb").read() == open(tokenizer.path, "rb").read()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_custom_model_cache_beams_and_loss(tmp_path, tokenizer):
    # XLabForCausalLM's own cache: beam search reorders it, so cached beams equal uncached ones; labels give the
    # next-token loss XLab computes
    model, outdir, cls, _ = _export(tmp_path, tokenizer, seed=7, position="alibi", sliding_window=6, qk_norm=True)
    hf = _load(outdir, cls)
    prompt = torch.tensor([[tokenizer.sos_id, 40, 41, 42]])
    for beams in (1, 3):
        cached = hf.generate(prompt, max_new_tokens=14, num_beams=beams, do_sample=False)
        uncached = hf.generate(prompt, max_new_tokens=14, num_beams=beams, do_sample=False, use_cache=False)
        assert cached.tolist() == uncached.tolist(), beams
    x = torch.randint(4, len(tokenizer), (2, 20))
    with torch.no_grad():
        loss = hf(input_ids=x, labels=x).loss
        expected = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert loss == pytest.approx(float(expected), abs=1e-5)


RECIPE_VARIANTS = {  # on the Llama-shaped block: only the variant keeps it from the stock class
    "moe": (dict(ffn="moe", n_experts=3, moe_top_k=2), "ffn='moe'"),
    "sgu": (dict(ffn="sgu"), "ffn='sgu'"),
    "head-qk": (dict(head_qk=8), "head-QK copy scores (head_qk=8)"),
    "d-embedding": (dict(d_embedding=16), "embedding projections (d_embedding=16)"),
    "softcap": (dict(logit_softcap=5.0), "logit soft-capping (logit_softcap=5.0)"),
    "value-embeddings": (dict(value_embeddings=1), "value_embeddings=1"),
    "relu2": (dict(ffn="relu2"), "ffn='relu2'"),
    "unet-skips": (dict(unet_skips=True), "unet_skips=True"),
}


@pytest.mark.parametrize("variant", RECIPE_VARIANTS)
def test_recipe_variants_export_as_the_custom_class_saying_why(tmp_path, tokenizer, variant):
    arch, why = RECIPE_VARIANTS[variant]
    base = dict(position="rope", norm="rmsnorm", ffn="swiglu", bias=False, embedding_scale=1.0)
    model, outdir, cls, reasons = _export(tmp_path, tokenizer, seed=5, **{**base, **arch})
    assert cls == "XLabForCausalLM"
    assert why in reasons["LlamaForCausalLM"]
    _assert_parity(model, _load(outdir, cls), tokenizer, seed=5)
