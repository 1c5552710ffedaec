"""The Lightning side of XLab: loss, metrics, optimizer and schedule around a plain ``xlabml.layers.Decoder``.

``XLabModule`` holds the training concerns for any module with the Decoder's forward; ``XLabModel`` is the
one class with the full signature (architecture + training), the one that calls ``save_hyperparameters``,
so ``XLabModel.load_from_checkpoint(path)`` rebuilds the architecture.

Optimizer and schedule from YAML (under ``model:``; stepped every optimizer step, not every epoch)::

    model:
      optimizer:
        class_path: torch.optim.AdamW
        init_args: {lr: 0.001, betas: [0.9, 0.95], weight_decay: 0.1}
      scheduler:
        class_path: xlabml.schedules.WarmupCosine
        init_args: {warmup_steps: 100, total_steps: null, min_lr_ratio: 0.1}
"""

import math
import time
import warnings

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import grad_norm

from .layers import Decoder
from .schedules import WarmupCosine  # noqa: F401  (re-exported: xlabml.models.WarmupCosine)


def default_optimizer(params, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW, lr 3e-4, betas (0.9, 0.95), weight decay 0.1 (applied to the decay group only).

    On CPU it uses the fused kernel (one kernel for all parameters instead of a dozen small ops per tensor:
    about 2 ms less per step for the 4-layer reference model). On GPU the default multi-tensor path is
    already fast. ``fused=False`` forces the plain kernel (Lightning refuses gradient clipping with a fused
    optimizer under mixed precision; ``XLabModule.configure_optimizers`` passes it then)."""
    params = list(params)
    tensors = [p for group in params for p in (group['params'] if isinstance(group, dict) else [group])]
    if fused is None:
        fused = all(p.device.type == 'cpu' and p.is_floating_point() for p in tensors) or None
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)


class XLabModule(L.LightningModule):
    """Training concerns around ``self.model`` (set by the subclass): pad-ignoring cross-entropy,
    token-weighted metrics, throughput, debug checks, parameter groups and a per-step schedule.

    Batches are dicts of LongTensors (b, t): ``x``, ``y`` (``pad_index`` where the target is ignored), and for
    packed data ``positions`` and ``doc_ids``.

    Logged: ``{train,val,test}_loss`` and ``_acc`` (token-weighted: batch_size = number of non-pad targets),
    ``val_ppl``/``val_bpt`` and ``test_ppl``/``test_bpt`` (exp and log2 of the epoch's token-mean loss),
    ``lr``, ``tokens/s`` (input tokens per second of training-step wall time, forward to optimizer step, over
    the steps since the last log); training metrics are logged every ``log_every_n_steps`` steps (when the
    logger writes) and at the first step. With ``debug``: the 2-norm of every gradient before each
    optimizer step, and a warning on a non-finite training loss.
    """
    model: nn.Module

    def __init__(self, *, pad_index: int | None, optimizer: OptimizerCallable | None,
                 scheduler: LRSchedulerCallable | None, compile: bool, weight_decay_embeddings: bool,
                 debug: bool):
        super().__init__()
        self.pad_index = pad_index
        self.optimizer = optimizer or default_optimizer
        self.scheduler = scheduler
        self.compile_model = compile
        self.weight_decay_embeddings = weight_decay_embeddings
        self.debug = debug
        self._throughput = [0, 0.0, 0.0]  # tokens, seconds, start of the current step
        self._totals = {}  # stage -> [summed loss, target count] for perplexity

    def configure_model(self):
        if self.compile_model and not getattr(self, '_compiled', False):
            self.model.compile()  # in place: parameter names (and checkpoints) stay as without compile
            self._compiled = True

    def forward(self, x, positions=None, doc_ids=None, cache=None, input_pos=None, *, last_only: bool = False,
                memory=None):
        """Logits (b, t, n_vocab) of the wrapped model; see ``xlabml.layers.Decoder.forward``."""
        extra = {'memory': memory} if memory is not None else {}  # a wrapped model need not know the keyword
        return self.model(x, positions=positions, doc_ids=doc_ids, cache=cache, input_pos=input_pos,
                          last_only=last_only, **extra)

    def init_cache(self, batch_size, max_len=None, device=None, dtype=None, *, static: bool = False, **options):
        """A KV cache for the wrapped model; see ``xlabml.layers.Decoder.init_cache`` (``options``: its
        compression keywords)."""
        return self.model.init_cache(batch_size, max_len, device=device, dtype=dtype, static=static, **options)

    # ------------------------------------------------------------------------------------- loss, metrics

    def _ignore_index(self):
        return self.pad_index if self.pad_index is not None else -100

    def loss(self, logits, targets, accuracy: bool = True):
        """Token-mean cross-entropy over non-pad targets (logits cast to float: bf16 logits lose precision
        in the softmax), the number of such targets, and the number predicted correctly (argmax; None
        without ``accuracy``)."""
        ignore = self._ignore_index()
        valid = targets != ignore
        n = valid.sum()
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore,
                              reduction='sum')
        correct = None
        if accuracy:
            with torch.no_grad():
                correct = ((logits.argmax(dim=-1) == targets) & valid).sum()
        return nll / n.clamp(min=1), n, correct

    def _model_inputs(self, batch):
        inputs = dict(positions=batch.get('positions'), doc_ids=batch.get('doc_ids'))
        if getattr(self.model, 'memory_len', 0):
            inputs['memory'] = self._segment_memory(batch)
        return inputs

    # ------------------------------------------------------------------------------------- segment memory

    def _segment_memory(self, batch):
        """The model's segment memory (``xlabml.memory``) of the running stage, told which rows restart."""
        if 'reset' not in batch:
            raise ValueError(f"model.memory_len={self.model.memory_len} needs consecutive segments of each batch row "
                             "(data.segments: true), not independent windows")
        stage = 'train' if self.training else self._eval_stage()
        memories = self.__dict__.setdefault('_memories', {})
        if stage not in memories:
            from .memory import SegmentMemory
            memories[stage] = SegmentMemory(recompute=self.model.memory_grad == 'recompute')
        return memories[stage].segment(batch['reset'])

    def _eval_stage(self):
        stage = getattr(getattr(self._trainer, 'state', None), 'stage', None)
        return {'sanity_check': 'validate'}.get(getattr(stage, 'value', None), getattr(stage, 'value', 'eval'))

    def _forget_memory(self, stage):
        memory = getattr(self, '_memories', {}).get(stage)
        if memory is not None:
            memory.reset()

    def on_save_checkpoint(self, checkpoint):
        memory = getattr(self, '_memories', {}).get('train')
        if memory is not None:  # the training memory, for a resume that continues exactly
            checkpoint['segment_memory'] = memory.state_dict()

    def on_load_checkpoint(self, checkpoint):
        if checkpoint.get('segment_memory'):
            from .memory import SegmentMemory
            memory = SegmentMemory(recompute=getattr(self.model, 'memory_grad', 'none') == 'recompute')
            memory.load_state_dict(checkpoint['segment_memory'], device=self.device)
            self.__dict__.setdefault('_memories', {})['train'] = memory

    def _logging_step(self):
        # Training metrics are logged when the logger writes (every log_every_n_steps, and the first step):
        # each self.log call costs about a millisecond of Python on CPU, which is several percent of a
        # small model's step, and int(n) below is a host sync on GPU.
        if self._trainer is None:
            return True
        return self.global_step == 0 or (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _step(self, batch, stage):
        logits = self(batch['x'], **self._model_inputs(batch))
        log_now = stage != 'train' or self._logging_step()
        loss, n, correct = self.loss(logits, batch['y'], accuracy=log_now)
        if not log_now:
            return loss
        n_targets = int(n)
        on_step = stage == 'train'
        self.log(f'{stage}_loss', loss, batch_size=n_targets, prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 sync_dist=not on_step)
        self.log(f'{stage}_acc', correct / max(n_targets, 1), batch_size=n_targets, on_step=on_step,
                 on_epoch=not on_step, sync_dist=not on_step)
        if stage != 'train':
            totals = self._totals.setdefault(stage, [0.0, 0])
            totals[0] += loss.detach() * n_targets
            totals[1] += n_targets
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, 'train')
        if self.debug and not torch.isfinite(loss):
            warnings.warn(f"non-finite training loss {loss.item()} at step {self.global_step}", RuntimeWarning)
        if self._logging_step():
            self.log('lr', self.trainer.optimizers[0].param_groups[0]['lr'], on_step=True, on_epoch=False)
            tokens, seconds = self._throughput[:2]
            if seconds > 0:  # steps completed since the last log
                self.log('tokens/s', tokens / seconds, on_step=True, on_epoch=False, prog_bar=True)
            self._throughput[:2] = [0, 0.0]
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        self._throughput[2] = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._throughput[0] += batch['x'].numel()
        self._throughput[1] += time.perf_counter() - self._throughput[2]

    def validation_step(self, batch, batch_idx):
        return self._step(batch, 'val')

    def test_step(self, batch, batch_idx):
        return self._step(batch, 'test')

    def on_validation_epoch_start(self):
        self._totals.pop('val', None)
        self._forget_memory('validate')

    def on_test_epoch_start(self):
        self._totals.pop('test', None)
        self._forget_memory('test')

    def on_validation_epoch_end(self):
        self._log_perplexity('val')

    def on_test_epoch_end(self):
        self._log_perplexity('test')

    def _log_perplexity(self, stage):
        if stage not in self._totals:
            return
        summed, count = self._totals.pop(stage)
        summed = torch.as_tensor(summed, dtype=torch.float64, device=self.device)
        count = torch.as_tensor(count, dtype=torch.float64, device=self.device)
        summed = self.trainer.strategy.reduce(summed, reduce_op='sum')
        count = self.trainer.strategy.reduce(count, reduce_op='sum')
        mean = (summed / count.clamp(min=1)).float()
        # already reduced over the ranks, so equal on all of them: sync_dist averages equal values (a no-op on
        # one process) and spares Lightning's per-epoch "use sync_dist=True" warning under DDP
        self.log(f'{stage}_ppl', mean.exp(), sync_dist=True)
        self.log(f'{stage}_bpt', mean / math.log(2), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        """With targets: ``{'loss': (b,) mean NLL per sequence over its non-pad targets, 'tokens': (b,) their
        number}`` (for scoring texts); without ``y``: ``{'next': (b, t) greedy next-token ids}``."""
        logits = self(batch['x'], **self._model_inputs(batch))
        if 'y' not in batch:
            return {'next': logits.argmax(dim=-1)}
        ignore = self._ignore_index()
        y = batch['y']
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=ignore, reduction='none')  # b t
        tokens = (y != ignore).sum(dim=1)
        return {'loss': nll.sum(dim=1) / tokens.clamp(min=1), 'tokens': tokens}

    # --------------------------------------------------------------------------------- debug, optimizer

    def on_before_optimizer_step(self, optimizer):
        if self.debug:
            self.log_dict(grad_norm(self.model, norm_type=2))

    def parameter_groups(self):
        """``[decay, no_decay]`` parameter groups: matrices (dim >= 2) decay; biases, norm weights and (unless
        ``weight_decay_embeddings``) embedding tables, including a head tied to the embedding, do not. The
        decay group takes the optimizer's weight_decay, the other 0."""
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay, seen = [], [], set()
        for p in self.model.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() >= 2 and (self.weight_decay_embeddings or id(p) not in embeddings):
                decay.append(p)
            else:
                no_decay.append(p)
        return [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}]

    def _clips_mixed(self):
        if self._trainer is None:
            return False
        return bool(self.trainer.gradient_clip_val) and isinstance(self.trainer.precision_plugin, MixedPrecision)

    def configure_optimizers(self):
        if self.optimizer is default_optimizer:
            optimizer = default_optimizer(self.parameter_groups(), fused=False if self._clips_mixed() else None)
        else:
            optimizer = self.optimizer(self.parameter_groups())
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        if getattr(scheduler, 'total_steps', 0) is None:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("scheduler total_steps=None needs a finite run (trainer max_steps or "
                                 "max_epochs); set total_steps explicitly")
            scheduler.total_steps = max(int(total), scheduler.warmup_steps + 1)
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': scheduler, 'interval': 'step'}}


class XLabModel(XLabModule):
    """A GPT-style decoder (``xlabml.layers.Decoder``) with its training loop.

    Architecture arguments are those of ``Decoder`` (see there); the rest:
        pad_index: target id ignored by the loss and metrics (the tokenizer's ``<pad>``; linked from data).
        optimizer: callable taking parameter groups; default ``default_optimizer`` (AdamW lr 3e-4, wd 0.1).
        scheduler: callable taking the optimizer, stepped every optimizer step; default None (constant lr).
            E.g. ``xlabml.schedules.WarmupCosine``.
        compile: ``torch.compile`` the decoder (in place; checkpoints unchanged).
        activation_checkpointing: recompute each block's activations in backward (less memory).
        weight_decay_embeddings: also decay embedding tables (default: only non-embedding matrices decay).
        debug: log gradient norms, warn on a non-finite loss.
        registers, kv_share, layer_windows, memory_len, memory_grad, rope_scaling, rope_scale: memory and
            long-context variants of the architecture (see ``Decoder``); ``memory_len`` needs
            ``data.segments: true`` (``xlabml.memory``).
    Optimizer and scheduler are not saved in the hyperparameters (they are configuration of the run, and
    may not pickle); ``load_from_checkpoint`` gets the defaults unless given.
    """

    def __init__(self, n_vocab: int, max_len: int, d_model: int = 512, n_layers: int = 6, n_heads: int = 8,
                 d_ff: int = 2048, dropout: float = 0.1, *, n_kv_heads: int | None = None,
                 position: str = 'sinusoidal', rope_base: float = 10000.0, rope_fraction: float = 1.0,
                 norm: str = 'layernorm', prenorm: bool = True, final_norm: bool = True, ffn: str = 'gelu',
                 attention: str = 'sdpa', sliding_window: int | None = None, qk_norm: bool = False,
                 dropout_attn: bool = True, dropout_ffn: bool = True, dropout_residual: bool = False,
                 dropout_embedding: bool = False, tie_embeddings: bool = False, parallel_residual: bool = False,
                 bias: bool = True, pad_index: int | None = 3, optimizer: OptimizerCallable = default_optimizer,
                 scheduler: LRSchedulerCallable | None = None, compile: bool = False,
                 activation_checkpointing: bool = False, weight_decay_embeddings: bool = False,
                 embedding_scale: float | None = None, debug: bool = False, registers: int = 0, kv_share: int = 1,
                 layer_windows: list[str | int | None] | None = None, memory_len: int = 0,
                 memory_grad: str = 'none', rope_scaling: str | None = None, rope_scale: float = 1.0):
        super().__init__(pad_index=pad_index, optimizer=optimizer, scheduler=scheduler, compile=compile,
                         weight_decay_embeddings=weight_decay_embeddings, debug=debug)
        self.save_hyperparameters(ignore=['optimizer', 'scheduler'])
        self.model = Decoder(
            n_vocab, max_len, d_model, n_layers, n_heads, d_ff, dropout, n_kv_heads=n_kv_heads,
            position=position, rope_base=rope_base, rope_fraction=rope_fraction, norm=norm, prenorm=prenorm,
            final_norm=final_norm, ffn=ffn, attention=attention, sliding_window=sliding_window, qk_norm=qk_norm,
            dropout_attn=dropout_attn, dropout_ffn=dropout_ffn, dropout_residual=dropout_residual,
            dropout_embedding=dropout_embedding, tie_embeddings=tie_embeddings,
            parallel_residual=parallel_residual, bias=bias, activation_checkpointing=activation_checkpointing,
            embedding_scale=embedding_scale, registers=registers, kv_share=kv_share, layer_windows=layer_windows,
            memory_len=memory_len, memory_grad=memory_grad, rope_scaling=rope_scaling, rope_scale=rope_scale)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only=None, **kwargs):
        """The model of a training checkpoint or an export, by ``xlabml.checkpoints.load_checkpoint`` (every
        format, one clear error, flash falling back to SDPA where flash_attn is missing); keywords override
        recorded hyperparameters, e.g. ``attention='sdpa'``."""
        if hparams_file is not None or weights_only is False:
            raise ValueError("XLabModel.load_from_checkpoint takes no hparams_file and needs weights_only: pass "
                             "hyperparameters to override as keywords")
        from .checkpoints import load_checkpoint
        return load_checkpoint(checkpoint_path, map_location, overrides=kwargs, tokenizer=False,
                               strict=strict is not False, model_class=cls).model
