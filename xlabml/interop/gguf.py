"""GGUF export for llama.cpp (``export_gguf``), written with the ``gguf`` package.

Two llama.cpp architectures take XLab models:

- ``llama``: rotary positions on every head dimension, RMSNorm, SwiGLU, any ``n_kv_heads``, no biases (or all
  zero), no QK-norm, no sliding window. Computes what XLab computes. llama.cpp rotates adjacent pairs of
  dimensions where XLab (like ``transformers``) rotates the two halves of a head, so the query and key rows of
  every head are reordered (as llama.cpp's own converter does); the attention scores are unchanged.
- ``gpt2``: learned positions, LayerNorm, GELU, multi-head attention. llama.cpp's ``gpt2`` graph computes GELU
  with its tanh approximation where XLab's is exact, so its logits differ slightly (about 1e-3 per activation).

In both, pre-norm with a final norm and an embedding scale of 1 (or an untied table, which takes the scale) are
required, as for a stock ``transformers`` class (``xlabml.interop.hf``). Weights: ``f32``; ``f16`` or ``q8_0``
for the matrices (norms and biases stay f32; a matrix whose rows are not a multiple of 32 stays f16 under q8_0).

The tokenizer is stored as llama.cpp's SentencePiece model (``tokenizer.ggml.model = "llama"``: the pieces, their
scores and kinds, no space prefix, ``<sos>`` added at the start): llama.cpp merges by score and falls back to bytes
as SentencePiece does, so a text without ``▁`` (U+2581) and without U+E000 gets exactly XLab's ids, and ids decode
to exactly XLab's text when they contain no U+E000 piece. XLab's escaping layer (``xlabml.tokenizer``) is not
there: llama.cpp reads a ``▁`` in a text as a space, and shows an escaped pair (``U+E000 u``, ``U+E000 U+E000``)
as those two characters. Rows of the embedding past the tokenizer's vocabulary get unused ``<unused_N>`` tokens.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from xlabml.layers import swiglu_hidden
from xlabml.tokenizer import Tokenizer

from . import check_new, load_model, require
from .hf import EPS, _common, _embedding, _nonzero_biases, _rotated, _split_qkv, _with_bias, decoder_arguments

TYPES = ("f32", "f16", "q8_0")
APPROXIMATE = {"gpt2": "llama.cpp's gpt2 graph computes GELU with its tanh approximation (XLab's GELU is exact), "
                       "so its logits differ slightly from XLab's"}
_KINDS = {"normal": 1, "unknown": 2, "control": 3, "unused": 5, "byte": 6}  # gguf.TokenType


def gguf_architecture(arch: dict, sd: dict) -> str:
    """``llama`` or ``gpt2``: the llama.cpp architecture computing the XLab decoder ``arch`` with weights ``sd``;
    raises ValueError naming what does not map."""
    common = _common(arch, sd)
    head_dim = arch["d_model"] // arch["n_heads"]
    if arch["position"] == "rope":
        why = (common or _mismatch(arch, norm="rmsnorm", ffn="swiglu", parallel_residual=False, qk_norm=False,
                                   sliding_window=None)
               or (f"partial rotary (rope_fraction={arch['rope_fraction']})" if _rotated(arch) != head_dim else None)
               or ("biases (bias: true)" if _nonzero_biases(sd) else None))
        if why is None:
            return "llama"
        raise ValueError(f"this model does not map to llama.cpp's llama architecture: {why}")
    if arch["position"] == "learned":
        why = (common or _mismatch(arch, norm="layernorm", ffn="gelu", parallel_residual=False, qk_norm=False,
                                   sliding_window=None)
               or (f"grouped-query attention (n_kv_heads={arch['n_kv_heads']})"
                   if arch["n_kv_heads"] != arch["n_heads"] else None))
        if why is None:
            return "gpt2"
        raise ValueError(f"this model does not map to llama.cpp's gpt2 architecture: {why}")
    raise ValueError(f"position={arch['position']!r} does not map to GGUF: llama.cpp's llama takes 'rope', "
                     "its gpt2 'learned'")


def _mismatch(arch, **wanted):
    for key, value in wanted.items():
        if arch[key] != value:
            return f"{key}={arch[key]!r} (needs {value!r})"
    return None


def _interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k (heads x head_dim, ...) from rotate-half order (dims i and i + d/2 form a pair) to llama.cpp's
    adjacent pairs (2i, 2i + 1), per head: the inverse of the permutation ``transformers`` undoes on GGUF import."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# per block of llama.cpp's gpt2: (GGUF name, XLab name), both in Linear (out, in) layout
GPT2_BLOCK = (("attn_norm", "norm1"), ("attn_qkv", "attn.qkv"), ("attn_output", "attn.proj"), ("ffn_norm", "norm2"),
              ("ffn_up", "ffn.fc"), ("ffn_down", "ffn.proj"))


def gguf_tensors(arch: dict, sd: dict, name: str) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors (by GGUF name, PyTorch (out, in) layout) for architecture ``name``."""
    out = {"token_embd.weight": _embedding(arch, sd), "output_norm.weight": sd["norm.weight"]}
    if not arch["tie_embeddings"]:
        out["output.weight"] = sd["head.weight"]
    if name == "gpt2":
        out["position_embd.weight"] = sd["position.embedding.weight"]
        _with_bias(out, sd, "output_norm", "norm")
    for i in range(arch["n_layers"]):
        p, b = f"blk.{i}.", f"blocks.{i}."
        if name == "llama":
            (q, k, v), _ = _split_qkv(arch, sd, i)
            gate, up = sd[b + "ffn.fc.weight"].chunk(2)
            out.update({p + "attn_q.weight": _interleave_rotary(q, arch["n_heads"]),
                        p + "attn_k.weight": _interleave_rotary(k, arch["n_kv_heads"]), p + "attn_v.weight": v,
                        p + "attn_output.weight": sd[b + "attn.proj.weight"], p + "ffn_gate.weight": gate,
                        p + "ffn_up.weight": up, p + "ffn_down.weight": sd[b + "ffn.proj.weight"],
                        p + "attn_norm.weight": sd[b + "norm1.weight"], p + "ffn_norm.weight": sd[b + "norm2.weight"]})
        else:
            for theirs, ours in GPT2_BLOCK:
                _with_bias(out, sd, p + theirs, b + ours)
    return out


def _tokenizer_metadata(writer, tokenizer: Tokenizer, n_vocab: int) -> None:
    from .hf_tokenizer import vocabulary

    pieces, scores, kinds = vocabulary(tokenizer)
    extra = n_vocab - len(pieces)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces + [f"<unused_{i}>" for i in range(extra)])
    writer.add_token_scores(scores + [-1e9] * extra)
    writer.add_token_types([_KINDS[k] for k in kinds] + [_KINDS["unused"]] * extra)
    writer.add_bos_token_id(tokenizer.sos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


def _encode(gguf, name: str, tensor: torch.Tensor, out_type: str):
    """(data, raw_dtype) of one tensor: matrices in ``out_type``, vectors in f32."""
    data = tensor.detach().float().contiguous().numpy()
    if data.ndim < 2 or out_type == "f32":
        return data, None
    if out_type == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, out_type: str = "f16",
                tokenizer: str | None = None) -> tuple[Path, str]:
    """Write ``checkpoint`` as a GGUF file ``out`` (which must not exist; written beside it, then linked).

    Args:
        out_type: ``f32``, ``f16`` or ``q8_0`` for the weight matrices.
        tokenizer: the tokenizer model file (default: the one the checkpoint's data settings name).
    Returns:
        (out, the llama.cpp architecture written: ``llama`` or ``gpt2``).
    """
    gguf = require("gguf", "gguf")
    from xlabml.atomic import atomic_path

    if out_type not in TYPES:
        raise ValueError(f"unknown GGUF type {out_type!r}; expected one of {', '.join(TYPES)}")
    checkpoint, out = str(checkpoint), check_new(out)
    loaded = load_model(checkpoint, tokenizer=tokenizer)
    model, tok = loaded.model, loaded.tokenizer
    arch = decoder_arguments(dict(model.hparams))
    sd = {k: v.detach().cpu().float() for k, v in model.model.state_dict().items()}
    name = gguf_architecture(arch, sd)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), name)
        writer.add_name(Path(checkpoint).stem)
        writer.add_file_type(int(file_type))
        writer.add_context_length(arch["max_len"])
        writer.add_embedding_length(arch["d_model"])
        writer.add_block_count(arch["n_layers"])
        writer.add_head_count(arch["n_heads"])
        writer.add_vocab_size(arch["n_vocab"])
        if name == "llama":
            writer.add_head_count_kv(arch["n_kv_heads"])
            writer.add_feed_forward_length(swiglu_hidden(arch["d_ff"]))
            writer.add_layer_norm_rms_eps(EPS)
            writer.add_rope_dimension_count(arch["d_model"] // arch["n_heads"])
            writer.add_rope_freq_base(float(arch["rope_base"]))
        else:
            writer.add_feed_forward_length(arch["d_ff"])
            writer.add_layer_norm_eps(EPS)
        _tokenizer_metadata(writer, tok, arch["n_vocab"])
        for tensor_name, tensor in gguf_tensors(arch, sd, name).items():
            data, raw_dtype = _encode(gguf, tensor_name, tensor, out_type)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)  # quantized: shape in bytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out, name


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """A GGUF file's metadata (key -> value) and its tensors dequantized to float32 in PyTorch layout."""
    gguf = require("gguf", "gguf")
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        tensors[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return meta, tensors
