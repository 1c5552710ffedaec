"""Hugging Face ``transformers`` export and import.

``export_hf(checkpoint, outdir)`` writes a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load. When the architecture is exactly a stock one it is written as that
architecture, so tools that only know stock models (vLLM, TGI, llama.cpp's converter) take it:

===========================  ==============================================================================
stock class                  XLab configuration it represents exactly
===========================  ==============================================================================
``LlamaForCausalLM``         rope (full), rmsnorm, swiglu, any n_kv_heads
``MistralForCausalLM``       as Llama, with ``sliding_window``, no biases
``Qwen3ForCausalLM``         as Llama, with ``qk_norm``, no biases
``GPT2LMHeadModel``          learned positions, layernorm, gelu or relu, n_kv_heads = n_heads
``GPTNeoXForCausalLM``       rope (full or partial), layernorm, gelu or relu, n_kv_heads = n_heads, parallel
                             residual or not
===========================  ==============================================================================

and in every case: pre-norm with a final norm, no head bias (``bias: false``, or a head bias that is all zeros),
and embeddings scaled by 1 (a different ``embedding_scale`` is folded into an untied embedding table, which is
exact; a tied one cannot take it). A model without biases maps to GPT-2/GPT-NeoX (which always have them) with
zero biases. Everything else is written as ``XLabForCausalLM`` (``xlabml.interop.hf_model``), loaded with
``trust_remote_code=True`` and ``pip install 'xlabml[hf]'``; ``export_hf`` says why no stock class fitted.

``import_hf(hf_dir, out_ckpt)`` reads a local ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` directory (or an
``XLabForCausalLM`` export) into an XLab checkpoint (architecture, weights, and the tokenizer when the directory
holds an XLab one).
"""
from __future__ import annotations

import datetime
import inspect
import json
import math
import os
from pathlib import Path

import torch

from xlabml.layers import Decoder, swiglu_hidden
from xlabml.tokenizer import Tokenizer

from . import atomic_dir, check_new, load_model, require

DECODER_ARGUMENTS = tuple(name for name in inspect.signature(Decoder).parameters)
EPS = 1e-5  # XLab's norms (xlabml.layers.LayerNorm, RMSNorm)


def decoder_arguments(hparams: dict) -> dict:
    """The ``Decoder`` keyword arguments among an ``XLabModel``'s hyperparameters, with every default filled in
    (so a mapping never depends on a default changing) and the training-only options off."""
    defaults = {name: p.default for name, p in inspect.signature(Decoder).parameters.items()
                if p.default is not inspect.Parameter.empty}
    arch = {**defaults, **{k: v for k, v in hparams.items() if k in DECODER_ARGUMENTS}}
    # the kernel is how to run, but linear attention is another layer: it stays
    arch.update(attention="linear" if arch.get("attention") == "linear" else "sdpa", activation_checkpointing=False)
    if arch.get("n_kv_heads") is None:
        arch["n_kv_heads"] = arch["n_heads"]
    return arch


def _rotated(arch: dict) -> int:
    """Rotary dimensions per head, as ``xlabml.layers.RotaryPosition`` computes them."""
    head_dim = arch["d_model"] // arch["n_heads"]
    return int(head_dim * arch["rope_fraction"]) // 2 * 2


def _embedding_scale(arch: dict) -> float:
    scale = arch.get("embedding_scale")
    return math.sqrt(arch["d_model"]) if scale is None else float(scale)


# ------------------------------------------------------------------------------------------- stock classes

def _common(arch: dict, sd: dict) -> str | None:
    """Why no stock class can represent the model (None: any may, by its own conditions)."""
    if not arch["prenorm"]:
        return "post-norm blocks (prenorm: false)"
    if not arch["final_norm"]:
        return "no final norm (final_norm: false)"
    if _embedding_scale(arch) != 1.0 and arch["tie_embeddings"]:
        return f"embedding_scale={_embedding_scale(arch):g} with a tied head (stock models do not scale embeddings)"
    for key, what in (("d_embedding", "embedding projections"), ("head_qk", "head-QK copy scores"),
                      ("logit_softcap", "logit soft-capping")):
        if arch.get(key) is not None and not (key == "d_embedding" and arch[key] == arch["d_model"]):
            return f"{what} ({key}={arch[key]}); no stock class has them"
    bias = sd.get("head.bias")
    if bias is not None and bool(bias.ne(0).any()):
        return "a non-zero output head bias (bias: true); no stock class has a head bias"
    if arch.get("attention") == "linear":
        return "linear attention (attention: linear)"
    for key, plain in (("registers", 0), ("kv_share", 1), ("layer_windows", None), ("rope_scaling", None),
                       ("value_embeddings", 0), ("unet_skips", False)):
        if arch.get(key, plain) != plain:
            return f"{key}={arch[key]!r}"
    return None


def _need(arch: dict, **wanted) -> str | None:
    for key, allowed in wanted.items():
        value = arch[key]
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            return f"{key}={value!r}"
    return None


def _llama_family(arch, sd, *, window: bool, qk_norm: bool, bias_ok: bool) -> str | None:
    why = _need(arch, position="rope", norm="rmsnorm", ffn="swiglu", parallel_residual=False, qk_norm=qk_norm)
    if why:
        return why
    if _rotated(arch) != arch["d_model"] // arch["n_heads"]:
        return f"partial rotary (rope_fraction={arch['rope_fraction']})"
    if (arch["sliding_window"] is not None) != window:
        return f"sliding_window={arch['sliding_window']}"
    if arch["bias"] and not bias_ok and _nonzero_biases(sd):
        return "biases (bias: true)"
    return None


def _nonzero_biases(sd: dict) -> bool:
    return any(k.endswith(".bias") and bool(v.ne(0).any()) for k, v in sd.items())


def _check_llama(arch, sd):
    return _llama_family(arch, sd, window=False, qk_norm=False, bias_ok=True)


def _check_mistral(arch, sd):
    return _llama_family(arch, sd, window=True, qk_norm=False, bias_ok=False)


def _check_qwen3(arch, sd):
    return _llama_family(arch, sd, window=False, qk_norm=True, bias_ok=False)


def _check_gpt2(arch, sd):
    return (_need(arch, position="learned", norm="layernorm", ffn=("gelu", "relu"), parallel_residual=False,
                  qk_norm=False, sliding_window=None)
            or (f"grouped-query attention (n_kv_heads={arch['n_kv_heads']})"
                if arch["n_kv_heads"] != arch["n_heads"] else None))


def _check_neox(arch, sd):
    return (_need(arch, position="rope", norm="layernorm", ffn=("gelu", "relu"), qk_norm=False, sliding_window=None)
            or (f"grouped-query attention (n_kv_heads={arch['n_kv_heads']})"
                if arch["n_kv_heads"] != arch["n_heads"] else None))


def _llama_config(arch, ids, *, kind="llama"):
    config = dict(
        vocab_size=arch["n_vocab"], hidden_size=arch["d_model"], intermediate_size=swiglu_hidden(arch["d_ff"]),
        num_hidden_layers=arch["n_layers"], num_attention_heads=arch["n_heads"],
        num_key_value_heads=arch["n_kv_heads"], head_dim=arch["d_model"] // arch["n_heads"], hidden_act="silu",
        max_position_embeddings=arch["max_len"], rms_norm_eps=EPS, tie_word_embeddings=arch["tie_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": float(arch["rope_base"])}, attention_dropout=0.0,
        **ids)
    if kind == "llama":
        config.update(attention_bias=arch["bias"], mlp_bias=arch["bias"])
    elif kind == "mistral":
        config.update(sliding_window=arch["sliding_window"])
    elif kind == "qwen3":
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    return config


def _gpt2_config(arch, ids):
    return dict(vocab_size=arch["n_vocab"], n_positions=arch["max_len"], n_embd=arch["d_model"],
                n_layer=arch["n_layers"], n_head=arch["n_heads"], n_inner=arch["d_ff"],
                activation_function=arch["ffn"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                layer_norm_epsilon=EPS, tie_word_embeddings=arch["tie_embeddings"], **ids)


def _neox_config(arch, ids):
    head_dim = arch["d_model"] // arch["n_heads"]
    rotated = _rotated(arch)
    fraction = rotated / head_dim
    if int(head_dim * fraction) != rotated:  # transformers and vLLM take int(head_dim * factor)
        fraction = (rotated + 0.5) / head_dim
    return dict(vocab_size=arch["n_vocab"], hidden_size=arch["d_model"], num_hidden_layers=arch["n_layers"],
                num_attention_heads=arch["n_heads"], intermediate_size=arch["d_ff"], hidden_act=arch["ffn"],
                max_position_embeddings=arch["max_len"], layer_norm_eps=EPS,
                use_parallel_residual=arch["parallel_residual"], attention_bias=True,
                rope_parameters={"rope_type": "default", "rope_theta": float(arch["rope_base"]),
                                 "partial_rotary_factor": fraction},
                tie_word_embeddings=arch["tie_embeddings"], attention_dropout=0.0, hidden_dropout=0.0, **ids)


def _embedding(arch, sd):
    scale = _embedding_scale(arch)
    return sd["embedding.weight"] * scale if scale != 1.0 else sd["embedding.weight"]


def _split_qkv(arch, sd, i):
    d = arch["d_model"] // arch["n_heads"]
    sizes = (arch["n_heads"] * d, arch["n_kv_heads"] * d, arch["n_kv_heads"] * d)
    w = sd[f"blocks.{i}.attn.qkv.weight"].split(sizes)
    b = sd.get(f"blocks.{i}.attn.qkv.bias")
    return w, (b.split(sizes) if b is not None else (None, None, None))


def _with_bias(out: dict, sd: dict, theirs: str, ours: str, transpose: bool = False) -> None:
    """``theirs.weight``/``.bias`` from XLab's ``ours``: zeros where XLab has no bias (GPT-2, GPT-NeoX and llama.cpp's
    gpt2 always have them, and adding zero changes nothing)."""
    weight = sd[ours + ".weight"]
    out[theirs + ".weight"] = weight.t() if transpose else weight
    out[theirs + ".bias"] = sd.get(ours + ".bias", torch.zeros(weight.shape[0]))


def _llama_weights(arch, sd, biases=True):
    out = {"model.embed_tokens.weight": _embedding(arch, sd), "model.norm.weight": sd["norm.weight"]}
    if not arch["tie_embeddings"]:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(arch["n_layers"]):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        (q, k, v), (qb, kb, vb) = _split_qkv(arch, sd, i)
        gate, up = sd[b + "ffn.fc.weight"].chunk(2)
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": sd[b + "attn.proj.weight"],
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": sd[b + "ffn.proj.weight"],
                    p + "input_layernorm.weight": sd[b + "norm1.weight"],
                    p + "post_attention_layernorm.weight": sd[b + "norm2.weight"]})
        if arch["qk_norm"]:
            out[p + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.weight"]
            out[p + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.weight"]
        if biases and arch["bias"]:  # Llama's attention_bias/mlp_bias (Mistral, Qwen3: all zero, dropped)
            gate_b, up_b = sd[b + "ffn.fc.bias"].chunk(2)
            out.update({p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb,
                        p + "self_attn.v_proj.bias": vb, p + "self_attn.o_proj.bias": sd[b + "attn.proj.bias"],
                        p + "mlp.gate_proj.bias": gate_b, p + "mlp.up_proj.bias": up_b,
                        p + "mlp.down_proj.bias": sd[b + "ffn.proj.bias"]})
    return out


# per block: (GPT-2 name, XLab name); GPT-2's Conv1D layers store (in, out), the transpose of a Linear's weight
GPT2_BLOCK = (("ln_1", "norm1"), ("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("ln_2", "norm2"),
              ("mlp.c_fc", "ffn.fc"), ("mlp.c_proj", "ffn.proj"))


def _gpt2_weights(arch, sd):
    out = {"transformer.wte.weight": _embedding(arch, sd), "transformer.wpe.weight": sd["position.embedding.weight"]}
    _with_bias(out, sd, "transformer.ln_f", "norm")
    if not arch["tie_embeddings"]:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(arch["n_layers"]):
        for theirs, ours in GPT2_BLOCK:
            _with_bias(out, sd, f"transformer.h.{i}.{theirs}", f"blocks.{i}.{ours}", transpose=theirs[:2] != "ln")
    return out


def _neox_weights(arch, sd):
    c, h = arch["d_model"], arch["n_heads"]
    out = {"gpt_neox.embed_in.weight": _embedding(arch, sd)}
    _with_bias(out, sd, "gpt_neox.final_layer_norm", "norm")
    if not arch["tie_embeddings"]:
        out["lm_head.weight"] = sd["head.weight"]
    # the parallel block has one norm; GPT-NeoX's two norms then hold the same weights
    norm2 = "norm1" if arch["parallel_residual"] else "norm2"
    for i in range(arch["n_layers"]):
        p, b = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        for theirs, ours in (("input_layernorm", "norm1"), ("post_attention_layernorm", norm2),
                             ("attention.query_key_value", "attn.qkv"), ("attention.dense", "attn.proj"),
                             ("mlp.dense_h_to_4h", "ffn.fc"), ("mlp.dense_4h_to_h", "ffn.proj")):
            _with_bias(out, sd, p + theirs, b + ours)
        # GPT-NeoX's fused projection is grouped by head, [q_h; k_h; v_h] for each head h; XLab's is [q; k; v]
        qkv = p + "attention.query_key_value"
        out[qkv + ".weight"] = out[qkv + ".weight"].view(3, h, c // h, c).transpose(0, 1).reshape(3 * c, c)
        out[qkv + ".bias"] = out[qkv + ".bias"].view(3, h, c // h).transpose(0, 1).reshape(3 * c)
    return out


# name -> (transformers class, config class, why not, config kwargs, weights)
STOCK = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _check_llama, _llama_config, _llama_weights),
    "mistral": ("MistralForCausalLM", "MistralConfig", _check_mistral,
                lambda arch, ids: _llama_config(arch, ids, kind="mistral"),
                lambda arch, sd: _llama_weights(arch, sd, biases=False)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", _check_qwen3,
              lambda arch, ids: _llama_config(arch, ids, kind="qwen3"),
              lambda arch, sd: _llama_weights(arch, sd, biases=False)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", _check_gpt2, _gpt2_config, _gpt2_weights),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", _check_neox, _neox_config, _neox_weights),
}


def stock_architecture(arch: dict, sd: dict) -> tuple[str | None, dict[str, str]]:
    """The stock architecture that computes exactly what the XLab decoder ``arch`` with weights ``sd`` (decoder
    state dict, no ``model.`` prefix) computes: its name in ``STOCK``, or None and why each one does not."""
    common = _common(arch, sd)
    reasons = {}
    for name, (cls, _, why_not, _, _) in STOCK.items():
        reason = why_not(arch, sd) or common
        if reason is None:
            return name, {}
        reasons[cls] = reason
    return None, reasons


# -------------------------------------------------------------------------------------------------- export

def special_ids(tokenizer: Tokenizer) -> dict:
    return dict(bos_token_id=tokenizer.sos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def excluded_ids(tokenizer: Tokenizer, n_vocab: int) -> list[int]:
    """Ids ``xlab-infer`` never generates: ``<sos>``, ``<pad>`` and rows past the tokenizer's vocabulary."""
    return [tokenizer.sos_id, tokenizer.pad_id, *range(len(tokenizer), n_vocab)]


def build_hf_model(model, tokenizer: Tokenizer, force_custom: bool = False):
    """The ``transformers`` model computing what ``model`` (an ``XLabModel`` or ``Decoder``) computes, in fp32 on the
    CPU: a stock class where one fits (see the module docstring), else ``XLabForCausalLM``. Returns ``(hf_model,
    reasons)``, ``reasons`` mapping each stock class to why it did not fit (empty when one did)."""
    transformers = require("transformers", "hf")
    decoder = model.model
    arch = decoder_arguments(dict(model.hparams))
    sd = {k: v.detach().cpu().float() for k, v in decoder.state_dict().items()}
    name, reasons = (None, {"(all)": "custom class requested"}) if force_custom else stock_architecture(arch, sd)
    ids = special_ids(tokenizer)
    if name is None:
        from .hf_model import XLabConfig, XLabForCausalLM

        config = XLabConfig(architecture=arch, **ids)
        config.auto_map = {"AutoConfig": "configuration_xlab.XLabConfig",
                           "AutoModelForCausalLM": "modeling_xlab.XLabForCausalLM"}
        hf = XLabForCausalLM(config)
        hf.model.load_state_dict(sd, strict=True)
        return hf.eval(), reasons
    cls_name, config_name, _, make_config, weights = STOCK[name]
    config = getattr(transformers, config_name)(**make_config(arch, ids))
    hf = getattr(transformers, cls_name)(config)
    missing, unexpected = hf.load_state_dict(weights(arch, sd), strict=False)
    tied = {"lm_head.weight"} if arch["tie_embeddings"] else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"internal error mapping to {cls_name}: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    if arch["tie_embeddings"]:
        hf.tie_weights()
    return hf.eval(), reasons


def _config_yaml(checkpoint_path: str) -> str | None:
    """The run's ``config.yaml`` (LightningCLI writes it to the log version directory, above ``checkpoints/``)."""
    path = Path(checkpoint_path).resolve()
    for candidate in (path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate.read_text()
    return None


def model_card(checkpoint_path: str, hparams: dict, data_hparams: dict, cls_name: str, reasons: dict,
               metrics: dict, tokenizer: Tokenizer, step: int | None) -> str:
    from xlabml import __version__

    custom = cls_name == "XLabForCausalLM"
    remote = ", trust_remote_code=True" if custom else ""
    lines = [
        "---", "library_name: transformers", "tags: [xlabml, text-generation]", "---", "",
        f"# {Path(checkpoint_path).stem}", "",
        f"A decoder language model trained with [XLab](https://pypi.org/project/xlabml/) {__version__}, exported from "
        f"`{Path(checkpoint_path).name}`" + (f" (step {step})" if step is not None else "") +
        f" on {datetime.date.today().isoformat()} as `{cls_name}`.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'tokenizer = AutoTokenizer.from_pretrained("PATH"{remote})',
        f'model = AutoModelForCausalLM.from_pretrained("PATH"{remote})',
        'inputs = tokenizer("Once upon a time", return_tensors="pt")  # starts with <sos>, as xlab-infer does',
        "outputs = model.generate(**inputs, max_new_tokens=50, do_sample=False)",
        "print(tokenizer.decode(outputs[0], skip_special_tokens=True))", "```", "",
    ]
    if custom:
        lines += ["No stock `transformers` architecture computes this model exactly, so it loads with "
                  "`trust_remote_code=True` and needs `pip install 'xlabml[hf]'` (the code is XLab's own decoder). "
                  "Why each stock class did not fit:", ""]
        lines += [f"- `{cls}`: {reason}" for cls, reason in reasons.items()] + [""]
    lines += ["## Validation metrics", ""]
    if metrics:
        lines += [f"- {name}: {value}" for name, value in metrics.items()]
    else:
        lines += ["Not recorded in this checkpoint (an exported checkpoint keeps no callback state)."]
    lines += ["", "## Tokenizer", "",
              f"XLab's reversible SentencePiece BPE ({len(tokenizer)} tokens, content hash "
              f"`{tokenizer.content_hash}`), as `tokenizer.json` (same ids and text as `xlabml.tokenizer."
              "Tokenizer`) and as the original `tokenizer.model`. Special tokens: `<sos>` (prepended), `<eos>`, "
              "`<pad>`, `<unk>`; decode with `skip_special_tokens=True` to get XLab's text.", "",
              "## Training configuration", "", "Model:", "", "```json",
              json.dumps(_jsonable(hparams), indent=2, sort_keys=True), "```", "", "Data:", "", "```json",
              json.dumps(_jsonable(data_hparams), indent=2, sort_keys=True), "```", ""]
    config = _config_yaml(checkpoint_path)
    if config:
        lines += ["Run configuration (`config.yaml`):", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


_REMOTE_CONFIG = '''"""XLab model configuration: loads xlabml's (pip install 'xlabml[hf]')."""
from xlabml.interop.hf_model import XLabConfig  # noqa: F401
'''
_REMOTE_MODEL = '''"""XLab model: xlabml's decoder as a transformers model (pip install 'xlabml[hf]')."""
from xlabml.interop.hf_model import XLabConfig, XLabForCausalLM  # noqa: F401
'''


def export_hf(checkpoint: str | os.PathLike, outdir: str | os.PathLike, *, tokenizer: str | None = None,
              force_custom: bool = False) -> tuple[Path, str, dict]:
    """Write ``checkpoint`` (training checkpoint or export) as a ``transformers`` directory ``outdir`` (which must
    not exist; written into a temporary sibling, then renamed).

    Args:
        tokenizer: the tokenizer model file (default: the one the checkpoint's data settings name).
        force_custom: write ``XLabForCausalLM`` even where a stock class fits.
    Returns:
        (outdir, the ``transformers`` class name written, why each stock class did not fit).
    """
    require("transformers", "hf")
    from transformers import GenerationConfig
    from transformers.utils import logging

    checkpoint = str(checkpoint)
    outdir = check_new(outdir)
    loaded = load_model(checkpoint, tokenizer=tokenizer)
    model, tok, n_vocab = loaded.model, loaded.tokenizer, loaded.hparams["n_vocab"]
    hf, reasons = build_hf_model(model, tok, force_custom=force_custom)
    cls_name = type(hf).__name__
    generation = GenerationConfig(**special_ids(tok), suppress_tokens=excluded_ids(tok, n_vocab),
                                  max_length=model.hparams["max_len"])
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # one line of output per export, not a bar per file
    try:
        with atomic_dir(outdir) as tmp:
            _write(tmp, hf, generation, loaded, cls_name, reasons)
    finally:
        if bars:
            logging.enable_progress_bar()
    return outdir, cls_name, reasons


def _write(directory: Path, hf, generation, loaded, cls_name: str, reasons: dict) -> None:
    """The export's files: weights and config (``save_pretrained``), remote-code stubs for ``XLabForCausalLM``,
    the tokenizer, the source's hyperparameters in ``config.json["xlab"]``, the model card."""
    from . import hf_tokenizer

    hparams, tok = dict(loaded.hparams), loaded.tokenizer
    hf.generation_config = generation
    hf.save_pretrained(directory, safe_serialization=True)
    if cls_name == "XLabForCausalLM":
        (directory / "configuration_xlab.py").write_text(_REMOTE_CONFIG)
        (directory / "modeling_xlab.py").write_text(_REMOTE_MODEL)
    hf_tokenizer.save(tok, directory, model_max_length=hparams["max_len"])
    config = json.loads((directory / "config.json").read_text())
    config["xlab"] = {"source": Path(loaded.path).name, "tokenizer_hash": tok.content_hash,
                      "hyper_parameters": _jsonable(hparams)}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / "README.md").write_text(model_card(str(loaded.path), hparams, loaded.data_hparams, cls_name, reasons,
                                                    loaded.metrics, tok, loaded.global_step))


# -------------------------------------------------------------------------------------------------- import

def _read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory: no config.json")
    return json.loads(path.read_text())


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{hf_dir} holds no weights (*.safetensors or pytorch_model*.bin)")
    sd = {}
    for f in bins:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def _llama_from_hf(config, sd, approximate, notes):
    c, h = config["hidden_size"], config["num_attention_heads"]
    g = config.get("num_key_value_heads") or h
    head_dim = config.get("head_dim") or c // h
    if head_dim * h != c:
        raise ValueError(f"head_dim={head_dim} x num_attention_heads={h} != hidden_size={c}: XLab needs "
                         "d_model = n_heads x head size")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r}; XLab's swiglu needs 'silu'")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r}; XLab's rotary positions have no scaling (expected 'default')")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if config.get("pretraining_tp", 1) != 1:
        raise ValueError(f"pretraining_tp={config['pretraining_tp']}; expected 1")
    inter = config["intermediate_size"]
    d_ff = inter * 3 // 2
    if inter % 8 or swiglu_hidden(d_ff) != inter:
        raise ValueError(f"intermediate_size={inter}; XLab's swiglu hidden size is a multiple of 8 "
                         "(2/3 of d_ff rounded up)")
    bias = bool(config.get("attention_bias", False))
    if bool(config.get("mlp_bias", False)) != bias:
        raise ValueError(f"attention_bias={bias} but mlp_bias={config.get('mlp_bias')}; XLab has one bias option")
    eps = config.get("rms_norm_eps", 1e-6)
    _eps(eps, approximate, notes, "rms_norm_eps")
    tied = bool(config.get("tie_word_embeddings", False))
    arch = dict(n_vocab=config["vocab_size"], max_len=config.get("max_position_embeddings", 2048), d_model=c,
                n_layers=config["num_hidden_layers"], n_heads=h, n_kv_heads=g, d_ff=d_ff, position="rope",
                rope_base=float(theta), norm="rmsnorm", ffn="swiglu", tie_embeddings=tied, bias=bias,
                embedding_scale=1.0, dropout=0.0)
    out = {"embedding.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "head.weight": sd["model.embed_tokens.weight"] if tied else sd["lm_head.weight"]}
    if bias:
        out["head.bias"] = torch.zeros(config["vocab_size"], dtype=sd["model.norm.weight"].dtype)
    for i in range(arch["n_layers"]):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        out.update({
            b + "attn.qkv.weight": torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            b + "attn.proj.weight": sd[p + "self_attn.o_proj.weight"],
            b + "ffn.fc.weight": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
            b + "ffn.proj.weight": sd[p + "mlp.down_proj.weight"],
            b + "norm1.weight": sd[p + "input_layernorm.weight"],
            b + "norm2.weight": sd[p + "post_attention_layernorm.weight"]})
        if bias:
            out.update({
                b + "attn.qkv.bias": torch.cat([sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]),
                b + "attn.proj.bias": sd[p + "self_attn.o_proj.bias"],
                b + "ffn.fc.bias": torch.cat([sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"]]),
                b + "ffn.proj.bias": sd[p + "mlp.down_proj.bias"]})
    return arch, out


_GELU = {"gelu": "gelu", "relu": "relu"}
_GELU_APPROXIMATE = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2_from_hf(config, sd, approximate, notes):
    c, h = config.get("n_embd", 768), config.get("n_head", 12)
    act = config.get("activation_function", "gelu_new")
    if act in _GELU:
        ffn = _GELU[act]
    elif act in _GELU_APPROXIMATE and approximate:
        ffn = "gelu"
        notes.append(f"activation_function={act!r} (tanh GELU) imported as XLab's exact GELU")
    else:
        extra = " (or pass --approximate to use XLab's exact GELU)" if act in _GELU_APPROXIMATE else ""
        raise ValueError(f"activation_function={act!r}; XLab computes 'gelu' (exact) or 'relu'{extra}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if config.get(flag):
            raise ValueError(f"{flag}=true; XLab's attention does not do that")
    if config.get("scale_attn_weights", True) is not True:
        raise ValueError("scale_attn_weights=false; XLab scales attention by 1/sqrt(head size)")
    _eps(config.get("layer_norm_epsilon", 1e-5), approximate, notes, "layer_norm_epsilon")
    tied = bool(config.get("tie_word_embeddings", True))
    d_ff = config.get("n_inner") or 4 * c
    prefix = "transformer." if "transformer.wte.weight" in sd else ""
    arch = dict(n_vocab=config["vocab_size"], max_len=config.get("n_positions", 1024), d_model=c,
                n_layers=config.get("n_layer", 12), n_heads=h, d_ff=d_ff, position="learned", norm="layernorm",
                ffn=ffn, tie_embeddings=tied, bias=True, embedding_scale=1.0, dropout=0.0)
    wte = sd[prefix + "wte.weight"]
    out = {"embedding.weight": wte, "position.embedding.weight": sd[prefix + "wpe.weight"],
           "norm.weight": sd[prefix + "ln_f.weight"], "norm.bias": sd[prefix + "ln_f.bias"],
           "head.weight": wte if tied else sd["lm_head.weight"],
           "head.bias": torch.zeros(config["vocab_size"], dtype=wte.dtype)}  # XLab's head has a bias with bias=True
    for i in range(arch["n_layers"]):
        for theirs, ours in GPT2_BLOCK:
            weight = sd[f"{prefix}h.{i}.{theirs}.weight"]
            out[f"blocks.{i}.{ours}.weight"] = weight if theirs[:2] == "ln" else weight.t().contiguous()
            out[f"blocks.{i}.{ours}.bias"] = sd[f"{prefix}h.{i}.{theirs}.bias"]
    return arch, out


def _eps(eps, approximate, notes, name):
    if math.isclose(eps, EPS, rel_tol=1e-9):
        return
    if not approximate:
        raise ValueError(f"{name}={eps:g}; XLab's norms use eps={EPS:g} (pass --approximate to import anyway)")
    notes.append(f"{name}={eps:g} imported with XLab's eps={EPS:g}")


def _xlab_from_hf(config, sd, approximate, notes):
    arch = dict(config["architecture"])
    return arch, {k.removeprefix("model."): v for k, v in sd.items()}


IMPORTERS = {"LlamaForCausalLM": _llama_from_hf, "GPT2LMHeadModel": _gpt2_from_hf, "XLabForCausalLM": _xlab_from_hf}


def read_hf_model(hf_dir: str | os.PathLike, approximate: bool = False) -> tuple[dict, dict, dict]:
    """The XLab architecture (``Decoder`` arguments) and decoder weights of a local ``transformers`` directory of a
    class in ``IMPORTERS``, and ``{"class": ..., "config": ..., "approximations": [...]}``."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} not found")
    config = _read_hf_config(hf_dir)
    classes = config.get("architectures") or []
    cls = next((c for c in classes if c in IMPORTERS), None)
    if cls is None:
        raise ValueError(f"{hf_dir} holds {', '.join(classes) or config.get('model_type', 'an unknown model')}; "
                         f"import-hf reads {', '.join(IMPORTERS)}")
    notes: list[str] = []
    arch, weights = IMPORTERS[cls](config, _read_hf_weights(hf_dir), approximate, notes)
    return arch, weights, {"class": cls, "config": config, "approximations": notes}


def import_hf(hf_dir: str | os.PathLike, out_ckpt: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
              approximate: bool = False) -> tuple[Path, str | None, list[str]]:
    """Convert a local ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` directory (or an ``XLabForCausalLM`` export)
    into an XLab checkpoint at ``out_ckpt`` (which must not exist; written to a temporary file beside it, then
    linked into place).

    The checkpoint holds the architecture (``hyper_parameters``), the weights (fp32) and, when there is an XLab
    tokenizer (``tokenizer``, or the directory's ``tokenizer.model`` if it is one), its path in
    ``datamodule_hyper_parameters``, copied beside the checkpoint as ``<stem>.tokenizer.model``. A Llama or GPT-2
    tokenizer is not an XLab tokenizer (other special ids, no escaping), so then the weights come alone and
    ``infer.py`` / training need an XLab tokenizer of the same vocabulary.

    Args:
        approximate: accept what XLab computes only approximately (tanh GELU, another norm eps), listing it.
    Returns:
        (out_ckpt, the tokenizer path or None, the approximations made).
    """
    from xlabml.models import XLabModel

    hf_dir, out_ckpt = Path(hf_dir), Path(out_ckpt)
    check_new(out_ckpt)
    arch, weights, info = read_hf_model(hf_dir, approximate)
    cls, config, notes = info["class"], info["config"], info["approximations"]
    tok_source = Path(tokenizer) if tokenizer is not None else None
    if tok_source is not None:
        tok = Tokenizer.load(tok_source)  # raises for a missing file or a tokenizer that is not XLab's
    else:
        from .hf_tokenizer import find_xlab_tokenizer

        tok = find_xlab_tokenizer(hf_dir)
    if tok is not None and len(tok) > arch["n_vocab"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model only {arch['n_vocab']} classes")
    hparams = {**arch, "pad_index": tok.pad_id if tok is not None else config.get("pad_token_id")}
    model = XLabModel(**hparams)
    state = {"model." + k: v.float() for k, v in weights.items()}
    if arch["tie_embeddings"]:
        state.pop("model.head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (arch["tie_embeddings"] and k == "model.head.weight")]
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: weights do not match {cls}'s layout (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    import lightning

    from xlabml.atomic import atomic_path, write_atomic
    from xlabml.checkpoints import DATA_STATE_KEY

    checkpoint = {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": dict(model.hparams),
        "datamodule_hyper_parameters": {},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0, "global_step": 0,
        "xlab_import": {"source": str(hf_dir.resolve()), "architecture": cls, "approximations": notes},
    }
    tok_path = None
    if tok is not None:  # beside the checkpoint, recorded as a training checkpoint records its tokenizer
        tok_path = out_ckpt.with_name(out_ckpt.stem + ".tokenizer.model")
        checkpoint["datamodule_hyper_parameters"] = {"tokenizer_path": str(tok_path.resolve())}
        checkpoint[DATA_STATE_KEY] = {"tokenizer_hash": tok.content_hash, "tokenizer_path": str(tok_path.resolve())}
        write_atomic(tok_path, tok.model_proto)
    try:
        with atomic_path(out_ckpt) as tmp:
            torch.save(checkpoint, tmp)
    except BaseException:
        if tok_path is not None:
            tok_path.unlink(missing_ok=True)
        raise
    return out_ckpt, (str(tok_path) if tok_path else None), notes
