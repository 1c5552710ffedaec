"""``XLabConfig`` / ``XLabForCausalLM``: the XLab decoder as a ``transformers`` model, for the variants no stock
architecture computes (sinusoidal or ALiBi positions, QK-norm with LayerNorm, post-norm, embedding scale, ...).

The model is ``xlabml.layers.Decoder`` itself (``self.model``), built from ``config.architecture`` (the
decoder's keyword arguments), so its logits are XLab's by construction; this file only adapts the interface:
``attention_mask`` (left or right padding) becomes XLab's document ids (pads -1, tokens 0) and positions (the
count of real tokens before each one), and ``generate``'s cache is XLab's preallocated ``KVCache`` holding up to
``max_position_embeddings`` tokens (the model's ``max_len``).

An export loads it with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; the directory's
``modeling_xlab.py`` only imports this module, so ``pip install 'xlabml[hf]'`` is needed wherever it is loaded.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from xlabml.layers import Decoder


class XLabConfig(PreTrainedConfig):
    """``architecture``: the keyword arguments of ``xlabml.layers.Decoder``; the usual ``transformers`` names
    (``vocab_size``, ``hidden_size``, ...) mirror them for tools that read those."""
    model_type = "xlab"

    architecture: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        arch = self.architecture or {}
        for name, key in (("vocab_size", "n_vocab"), ("hidden_size", "d_model"), ("num_hidden_layers", "n_layers"),
                          ("num_attention_heads", "n_heads"), ("max_position_embeddings", "max_len")):
            if getattr(self, name) is None and key in arch:
                setattr(self, name, arch[key])
        if self.num_key_value_heads is None and arch:
            self.num_key_value_heads = arch.get("n_kv_heads") or arch.get("n_heads")
        self.tie_word_embeddings = bool(arch.get("tie_embeddings", self.tie_word_embeddings))
        super().__post_init__(**kwargs)


class XLabCache:
    """``generate``'s handle on an XLab ``KVCache``: how many slots are filled, and beam reordering."""

    def __init__(self, kv):
        self.kv = kv
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.kv.reorder(beam_idx)


class XLabForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = XLabConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: XLabConfig):
        super().__init__(config)
        self.model = Decoder(**config.architecture)
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.head.weight": "model.embedding.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own (XLab's) cache in its first cached forward

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embedding

    def get_output_embeddings(self) -> nn.Module:
        return self.model.head

    def _init_weights(self, module):
        # A weights file holds every parameter; what it lacks are the constant tables (rotary and sinusoidal
        # frequencies, ALiBi slopes: non-persistent buffers), taken from a one-layer decoder of the same architecture.
        # A model built without weights gets XLab's own initialisation.
        if module is self.model.position:
            fresh = Decoder(**{**self.config.architecture, "n_layers": 1, "n_vocab": 1, "layer_windows": None,
                               "kv_share": 1}).position
            for name, buffer in fresh.named_buffers(recurse=False):
                module.register_buffer(name, buffer.to(getattr(module, name).device), persistent=False)
        elif module is self.model:
            module.reset_parameters()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: XLabCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (b, t, vocab) of ``input_ids`` (b, t). ``attention_mask`` (b, past + t): 1 for tokens, 0 for
        pads (anywhere: pads are kept out of every real token's attention). ``labels`` (b, t): the next-token
        loss as ``transformers`` computes it (shifted inside, -100 ignored)."""
        if inputs_embeds is not None:
            raise ValueError("XLabForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("XLabForCausalLM needs input_ids")
        b, t = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past = cache.length if cache is not None else 0
        doc_ids = None
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}; expected (batch, length)")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded:
            mask = attention_mask[:, -(past + t):].long()
            if mask.shape[1] != past + t:
                raise ValueError(f"attention_mask covers {mask.shape[1]} tokens; expected {past + t}")
            doc_ids = torch.where(mask[:, past:] > 0, 0, -1)  # b t
            if position_ids is None:
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # b t
        elif position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        position_ids = position_ids[:, -t:]
        kv = None
        if use_cache:
            if cache is None:
                cache = XLabCache(self.model.init_cache(b, self.config.max_position_embeddings))
            if past + t > cache.kv.max_len:
                raise ValueError(f"{past + t} tokens exceed the XLab model's context of "
                                 f"{cache.kv.max_len} (max_position_embeddings); generate fewer tokens")
            kv = cache.kv
        last_only = logits_to_keep == 1
        if kv is not None:
            input_pos = torch.arange(past, past + t, device=input_ids.device)
            logits = self.model(input_ids, positions=position_ids, doc_ids=doc_ids, cache=kv, input_pos=input_pos,
                                last_only=last_only)
            cache.length = past + t
        else:
            logits = self.model(input_ids, positions=position_ids, doc_ids=doc_ids, last_only=last_only)
        if isinstance(logits_to_keep, int) and logits_to_keep > 1:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
