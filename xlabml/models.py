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
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import grad_norm

from .init_from import InitFrom, parse_init_from
from .layers import Decoder
from .lora import LoRAConfig, LoRASettings, apply_lora
from .losses import cross_entropy, linear_cross_entropy
from .metrics import target_bytes, token_bytes
from .posttrain.objective import Objective
from .roles import fused_rows, parameter_roles, unwrapped_name
from .schedules import WarmupCosine  # noqa: F401  (re-exported: xlabml.models.WarmupCosine)

# roles (xlabml.roles) whose parameters decay; embedding and position tables too with weight_decay_embeddings
DECAY_ROLES = frozenset({'matrix', 'head'})
EMBEDDING_ROLES = frozenset({'embedding', 'position'})


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

    The loss applies the head itself, ``loss_chunk_size`` rows at a time (``xlabml.losses``), when that is set
    and the wrapped model's ``head`` is a linear layer: the logits of the whole batch never exist at once.

    Logged: ``{train,val,test}_loss`` and ``_acc`` (token-weighted: batch_size = number of non-pad targets),
    ``val_ppl``/``val_bpt`` and ``test_ppl``/``test_bpt`` (exp and log2 of the epoch's token-mean loss),
    ``val_bpb``/``test_bpb`` (bits per byte of the text the targets decode to: tokenizer-independent, so models
    with different tokenizers compare; logged when the trainer's data module has a ``tokenizer``),
    ``lr``, ``tokens/s`` (input tokens per second of training-step wall time, forward to optimizer step, over
    the steps since the last log); training metrics are logged every ``log_every_n_steps`` steps (when the
    logger writes) and at the first step. With ``debug``: the 2-norm of every gradient before each
    optimizer step, and a warning on a non-finite training loss.

    Training objective: the cross-entropy (what ``train_loss`` logs), plus ``z_loss`` times the mean squared
    log-partition of the logits (logged as ``train_zloss``, with the largest |logit| as ``train_logit_absmax``,
    when ``z_loss`` is set or the model soft-caps its logits), plus ``moe_aux_loss`` times the mean of the
    auxiliary losses of the model's layers (a layer with an ``aux_loss`` attribute, e.g. the MoE feed-forward's
    load balancing; logged as ``train_moe_aux`` with ``train_moe_load_max``/``_min``, the most and least loaded
    expert's share of the routed tokens times the number of experts: 1.0 is perfect balance). Validation and
    test losses are the cross-entropy alone.
    With an ``objective`` (``xlabml.posttrain.objective.Objective``, e.g. DPO) the objective computes and logs
    each batch's loss instead.
    """
    model: nn.Module

    def __init__(self, *, pad_index: int | None, optimizer: OptimizerCallable | None,
                 scheduler: LRSchedulerCallable | None, compile: bool, weight_decay_embeddings: bool,
                 debug: bool, loss_chunk_size: int | None = None, z_loss: float = 0.0, moe_aux_loss: float = 0.0,
                 objective: Objective | None = None):
        super().__init__()
        for name, value in (('z_loss', z_loss), ('moe_aux_loss', moe_aux_loss)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if loss_chunk_size is not None and (not isinstance(loss_chunk_size, int) or loss_chunk_size < 1):
            raise ValueError(f"loss_chunk_size must be None (plain loss) or a positive number of rows, "
                             f"got {loss_chunk_size!r}")
        self.pad_index = pad_index
        self.loss_chunk_size = loss_chunk_size
        self.optimizer = optimizer or default_optimizer
        self.scheduler = scheduler
        self.compile_model = compile
        self.weight_decay_embeddings = weight_decay_embeddings
        self.debug = debug
        self.z_loss, self.moe_aux_loss = float(z_loss), float(moe_aux_loss)
        self.loss_parts = {}  # the training objective's parts at the last training step (detached)
        self._aux_layers = None  # the model's modules with an auxiliary loss, found on first use
        self.objective = objective
        self._throughput = [0, 0.0, 0.0]  # tokens, seconds, start of the current step
        self._totals = {}  # stage -> [summed loss, target count, target bytes] for perplexity and bits per byte
        self._byte_sizes = None  # UTF-8 bytes of each token id (xlabml.metrics.token_bytes), when known

    def configure_model(self):
        if self.compile_model and not getattr(self, '_compiled', False):
            self.model.compile()  # in place: parameter names (and checkpoints) stay as without compile
            self._compiled = True

    def forward(self, x, positions=None, doc_ids=None, cache=None, input_pos=None, *, last_only: bool = False,
                memory=None, return_hidden: bool = False):
        """Logits (b, t, n_vocab) of the wrapped model, or with ``return_hidden`` its final hidden states
        (b, t, c); see ``xlabml.layers.Decoder.forward``."""
        extra = {'return_hidden': True} if return_hidden else {}  # a wrapped model need not know the keywords
        if memory is not None:
            extra['memory'] = memory
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

    def _chunked_head(self):
        """The head the chunked loss applies, or None for the plain loss (no ``loss_chunk_size``, or a head
        that a transformation replaced by something other than a linear layer)."""
        head = getattr(self.model, 'head', None)
        if getattr(self.model, 'head_qk', None) is not None:  # logits are more than the head's: the plain loss
            return None
        return head if self.loss_chunk_size and isinstance(head, nn.Linear) else None

    def batch_loss(self, batch, accuracy: bool = True):
        """``loss(logits, batch['y'], accuracy)`` for the batch's logits, computed with the chunked loss when
        ``loss_chunk_size`` is set (equal up to float rounding, without materialising the logits).

        In training mode (``self.training``) the first value is the training objective instead (see the class
        docstring: cross-entropy + z-loss + auxiliary losses), and ``self.loss_parts`` holds its parts."""
        head = self._chunked_head()
        if not self.training:
            if head is None:
                return self.loss(self(batch['x'], **self._model_inputs(batch)), batch['y'], accuracy=accuracy)
            hidden = self(batch['x'], **self._model_inputs(batch), return_hidden=True)  # b t c
            nll, n, correct = linear_cross_entropy(hidden, head.weight, head.bias, batch['y'],
                                                   ignore_index=self._ignore_index(),
                                                   chunk_size=self.loss_chunk_size, accuracy=accuracy,
                                                   softcap=getattr(self.model, 'logit_softcap', None))
            return nll / n.clamp(min=1), n, correct
        return self._objective(batch, head, accuracy)

    def _objective(self, batch, head, accuracy):
        """The training objective of ``batch_loss``: (objective, n, correct), parts in ``self.loss_parts``."""
        ignore = self._ignore_index()
        y = batch['y']
        if head is None:
            logits = self(batch['x'], **self._model_inputs(batch))
            summed, stats = cross_entropy(logits, y, ignore_index=ignore, z_loss=self.z_loss)
            n = (y != ignore).sum()
            correct = None
            if accuracy:
                with torch.no_grad():
                    correct = ((logits.argmax(dim=-1) == y) & (y != ignore)).sum()
        else:
            hidden = self(batch['x'], **self._model_inputs(batch), return_hidden=True)  # b t c
            summed, n, correct, stats = linear_cross_entropy(
                hidden, head.weight, head.bias, y, ignore_index=ignore, chunk_size=self.loss_chunk_size,
                accuracy=accuracy, z_loss=self.z_loss, softcap=getattr(self.model, 'logit_softcap', None),
                return_stats=True)
        count = n.clamp(min=1)
        objective = summed / count
        parts = {'ce': stats['nll'] / count, 'zloss': stats['lse_sq'] / count, 'logit_absmax': stats['logit_absmax']}
        aux = [layer.aux_loss for layer in self._aux_loss_layers() if layer.aux_loss is not None]
        if aux:
            aux = torch.stack(aux).mean()
            objective = objective + self.moe_aux_loss * aux
            parts['moe_aux'] = aux.detach()
        self.loss_parts = parts
        return objective, n, correct

    def _aux_loss_layers(self):
        if self._aux_layers is None:
            self._aux_layers = [m for m in self.model.modules() if hasattr(m, 'aux_loss')]
        return self._aux_layers

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
        """What a resume needs beyond the weights: the training segment memory, the objective's state."""
        memory = getattr(self, '_memories', {}).get('train')
        if memory is not None:  # the training memory, for a resume that continues exactly
            checkpoint['segment_memory'] = memory.state_dict()
        if self.objective is not None:  # e.g. DPO's reference weights
            self.objective.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint):
        if checkpoint.get('segment_memory'):
            from .memory import SegmentMemory
            memory = SegmentMemory(recompute=getattr(self.model, 'memory_grad', 'none') == 'recompute')
            memory.load_state_dict(checkpoint['segment_memory'], device=self.device)
            self.__dict__.setdefault('_memories', {})['train'] = memory
        if self.objective is not None:
            self.objective.on_load_checkpoint(self, checkpoint)

    def _logging_step(self):
        # Training metrics are logged when the logger writes (every log_every_n_steps, and the first step):
        # each self.log call costs about a millisecond of Python on CPU, which is several percent of a
        # small model's step, and int(n) below is a host sync on GPU.
        if self._trainer is None:
            return True
        return self.global_step == 0 or (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _step(self, batch, stage):
        if self.objective is not None:
            return self.objective.step(self, batch, stage)
        if 'x' not in batch:
            raise ValueError(f"a batch with {sorted(batch)} is not one of token windows: preference pairs "
                             "(data.format: preference) need model.objective: xlabml.posttrain.dpo.DPO")
        log_now = stage != 'train' or self._logging_step()
        loss, n, correct = self.batch_loss(batch, accuracy=log_now)
        if not log_now:
            return loss
        n_targets = int(n)
        on_step = stage == 'train'
        shown = self.loss_parts['ce'] if on_step and self.training else loss  # the cross-entropy alone
        self.log(f'{stage}_loss', shown, batch_size=n_targets, prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 sync_dist=not on_step)
        if on_step and self.training:
            self._log_loss_parts(n_targets)
        self.log(f'{stage}_acc', correct / max(n_targets, 1), batch_size=n_targets, on_step=on_step,
                 on_epoch=not on_step, sync_dist=not on_step)
        if stage != 'train':
            totals = self._totals.setdefault(stage, [0.0, 0, 0])
            totals[0] += loss.detach() * n_targets
            totals[1] += n_targets
            if self._byte_sizes is not None:
                totals[2] += target_bytes(batch['y'], self._byte_sizes, self._ignore_index())
        return loss

    def _log_loss_parts(self, n_targets):
        parts = self.loss_parts
        if self.z_loss or getattr(self.model, 'logit_softcap', None) is not None:
            self.log('train_zloss', parts['zloss'], batch_size=n_targets, on_step=True, on_epoch=False)
            self.log('train_logit_absmax', parts['logit_absmax'], on_step=True, on_epoch=False)
        if 'moe_aux' in parts:
            self.log('train_moe_aux', parts['moe_aux'], on_step=True, on_epoch=False)
            loads = torch.stack([layer.load for layer in self._aux_loss_layers() if layer.load is not None])
            scaled = loads * loads.size(-1)  # layers experts: 1.0 = each expert gets its share
            self.log('train_moe_load_max', scaled.max(), on_step=True, on_epoch=False)
            self.log('train_moe_load_min', scaled.min(), on_step=True, on_epoch=False)

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
        self._throughput[0] += sum(v.numel() for k, v in batch.items() if k == 'x' or k.endswith('_x'))
        self._throughput[1] += time.perf_counter() - self._throughput[2]

    def validation_step(self, batch, batch_idx):
        return self._step(batch, 'val')

    def test_step(self, batch, batch_idx):
        return self._step(batch, 'test')

    def on_validation_epoch_start(self):
        self._totals.pop('val', None)
        self._forget_memory('validate')
        self._find_byte_sizes()

    def on_test_epoch_start(self):
        self._totals.pop('test', None)
        self._forget_memory('test')
        self._find_byte_sizes()

    def _find_byte_sizes(self):
        """The bytes each token id decodes to, from the data module's tokenizer (once; None without one)."""
        if self._byte_sizes is not None or self._trainer is None:
            return
        tokenizer = getattr(self.trainer.datamodule, 'tokenizer', None)
        if tokenizer is not None:
            self._byte_sizes = token_bytes(tokenizer, getattr(self.model, 'n_vocab', None)).to(self.device)

    def on_validation_epoch_end(self):
        self._log_perplexity('val')

    def on_test_epoch_end(self):
        self._log_perplexity('test')

    def _log_perplexity(self, stage):
        if stage not in self._totals:
            return
        summed, count, n_bytes = self._totals.pop(stage)
        summed = torch.as_tensor(summed, dtype=torch.float64, device=self.device)
        count = torch.as_tensor(count, dtype=torch.float64, device=self.device)
        n_bytes = torch.as_tensor(n_bytes, dtype=torch.float64, device=self.device)
        summed = self.trainer.strategy.reduce(summed, reduce_op='sum')
        count = self.trainer.strategy.reduce(count, reduce_op='sum')
        n_bytes = self.trainer.strategy.reduce(n_bytes, reduce_op='sum')
        mean = (summed / count.clamp(min=1)).float()
        # already reduced over the ranks, so equal on all of them: sync_dist averages equal values (a no-op on
        # one process) and spares Lightning's per-epoch "use sync_dist=True" warning under DDP
        self.log(f'{stage}_ppl', mean.exp(), sync_dist=True)
        self.log(f'{stage}_bpt', mean / math.log(2), sync_dist=True)
        if self._byte_sizes is not None and float(n_bytes) > 0:
            self.log(f'{stage}_bpb', (summed / math.log(2) / n_bytes).float(), sync_dist=True)

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
        """``[decay, no_decay]`` parameter groups, chosen by role (``xlabml.roles.parameter_roles``), so they are
        the same when FSDP has flattened every parameter into a 1-D shard: hidden matrices and an untied head
        decay; biases, norm gains and (unless ``weight_decay_embeddings``) the embedding and learned position
        tables, a head tied to the embedding included, do not; nor does a parameter of a module type XLab does
        not know (role ``other``). The decay group takes the optimizer's weight_decay, the other 0. Each group
        also lists the role of each of its parameters (``roles``) and, for a weight that stacks several matrices,
        their row counts (``rows``, else None; ``xlabml.roles.fused_rows``), which other optimizers ignore."""
        decaying = DECAY_ROLES | (EMBEDDING_ROLES if self.weight_decay_embeddings else frozenset())
        roles, fused = parameter_roles(self.model), fused_rows(self.model)
        decay = {'params': [], 'roles': [], 'rows': []}
        no_decay = {'params': [], 'roles': [], 'rows': [], 'weight_decay': 0.0}
        for name, p in self.model.named_parameters():  # a tied weight once
            if p.requires_grad:
                name = unwrapped_name(name)
                group = decay if roles[name] in decaying else no_decay
                group['params'].append(p)
                group['roles'].append(roles[name])  # for optimizers that treat roles apart (xlabml.optim.MuonAdamW)
                group['rows'].append(fused.get(name))  # stacked matrices (roles.fused_rows)
        return [decay, no_decay]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping, except clipping by norm under FSDP: the norm must be taken over every shard,
        which only the root FSDP module can do (``clip_grad_norm_``); Lightning's FSDP precision plugin refuses
        it instead."""
        root = self._fsdp_root()
        if root is not None and gradient_clip_val and (gradient_clip_algorithm or 'norm') == 'norm':
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _fsdp_root(self):
        """The root ``FullyShardedDataParallel`` module that Lightning wrapped this module in, if any."""
        if self._trainer is None or not torch.distributed.is_available():
            return None
        from torch.distributed.fsdp import FullyShardedDataParallel
        model = self.trainer.strategy.model
        return model if isinstance(model, FullyShardedDataParallel) else None

    def _clips_mixed(self):
        if self._trainer is None:
            return False
        return bool(self.trainer.gradient_clip_val) and isinstance(self.trainer.precision_plugin, MixedPrecision)

    def configure_optimizers(self):
        if self.optimizer is default_optimizer:
            optimizer = default_optimizer(self.parameter_groups(), fused=False if self._clips_mixed() else None)
        else:
            optimizer = self.optimizer(self.parameter_groups())
        root = self._fsdp_root()
        if root is not None and hasattr(optimizer, 'attach_fsdp'):  # Muon orthogonalises whole matrices
            optimizer.attach_fsdp(root)
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
        loss_chunk_size: compute the head and the loss this many rows (tokens) at a time, with the gradients of
            each chunk made at once (``xlabml.losses.linear_cross_entropy``): the batch's logits are never all in
            memory. None: the plain loss over the full logits.
        debug: log gradient norms, warn on a non-finite loss.
        z_loss: weight of the z-loss (mean squared log-partition of the logits) in the training objective.
        moe_aux_loss: weight of the MoE load-balancing loss (``ffn='moe'``) in the training objective.
        logit_softcap, d_embedding, n_experts, moe_top_k, head_qk, value_embeddings, unet_skips: architecture,
            see ``Decoder``.
        registers, kv_share, layer_windows, memory_len, memory_grad, rope_scaling, rope_scale: memory and
            long-context variants of the architecture (see ``Decoder``); ``memory_len`` needs
            ``data.segments: true`` (``xlabml.memory``).
        init_from: start from another model's weights (``xlabml.init_from``): a checkpoint or export path, a
            Hugging Face directory, or ``{path: ..., only: [embedding, ...]}`` for some weights only. Copied in
            ``setup`` at the start of a run, never over weights a checkpoint restored.
        lora: ``{rank, alpha, dropout, targets}`` (``xlabml.lora.LoRAConfig``): wrap the targeted linear layers in
            low-rank adapters and freeze the rest; needs ``init_from`` (the whole base). Checkpoints then hold
            the adapters and the base's path and weights hash only.
        objective: what to train for instead of next-token cross-entropy, e.g. ``xlabml.posttrain.dpo.DPO``
            (with ``data.format: preference``); None: cross-entropy on the non-pad targets.
    Optimizer, scheduler and objective are not saved in the hyperparameters (they are configuration of the run,
    and may not pickle); ``load_from_checkpoint`` gets the defaults unless given.
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
                 embedding_scale: float | None = None, debug: bool = False, loss_chunk_size: int | None = 8192,
                 z_loss: float = 0.0, moe_aux_loss: float = 0.01, logit_softcap: float | None = None,
                 d_embedding: int | None = None, n_experts: int = 8, moe_top_k: int = 2, head_qk: int | None = None,
                 registers: int = 0, kv_share: int = 1, layer_windows: list[str | int | None] | None = None,
                 memory_len: int = 0, memory_grad: str = 'none', rope_scaling: str | None = None,
                 rope_scale: float = 1.0, value_embeddings: int = 0, unet_skips: bool = False,
                 init_from: str | InitFrom | None = None,
                 lora: LoRASettings | None = None, objective: Objective | None = None):
        super().__init__(pad_index=pad_index, optimizer=optimizer, scheduler=scheduler, compile=compile,
                         weight_decay_embeddings=weight_decay_embeddings, debug=debug,
                         loss_chunk_size=loss_chunk_size, z_loss=z_loss, moe_aux_loss=moe_aux_loss,
                         objective=objective)
        self.save_hyperparameters(ignore=['optimizer', 'scheduler', 'objective'])
        self.model = Decoder(
            n_vocab, max_len, d_model, n_layers, n_heads, d_ff, dropout, n_kv_heads=n_kv_heads,
            position=position, rope_base=rope_base, rope_fraction=rope_fraction, norm=norm, prenorm=prenorm,
            final_norm=final_norm, ffn=ffn, attention=attention, sliding_window=sliding_window, qk_norm=qk_norm,
            dropout_attn=dropout_attn, dropout_ffn=dropout_ffn, dropout_residual=dropout_residual,
            dropout_embedding=dropout_embedding, tie_embeddings=tie_embeddings,
            parallel_residual=parallel_residual, bias=bias, activation_checkpointing=activation_checkpointing,
            embedding_scale=embedding_scale, logit_softcap=logit_softcap, d_embedding=d_embedding,
            n_experts=n_experts, moe_top_k=moe_top_k, head_qk=head_qk, registers=registers, kv_share=kv_share,
            layer_windows=layer_windows, memory_len=memory_len, memory_grad=memory_grad, rope_scaling=rope_scaling,
            rope_scale=rope_scale, value_embeddings=value_embeddings, unet_skips=unet_skips)
        self.init_from = parse_init_from(init_from)  # (path, only) or None
        self.lora_config = None if lora is None else LoRAConfig.from_settings(lora)
        self.lora_base = None  # {'path', 'hash'} of the base weights under the adapters, once they are loaded
        # True once the weights are set: by init_from, or by a checkpoint (load_checkpoint; xlab with --ckpt_path)
        self.init_from_done = False
        if self.lora_config is not None:
            if self.init_from is None:
                raise ValueError("model.lora needs model.init_from: the base model whose weights the adapters adapt")
            if self.init_from[1] is not None:
                raise ValueError(f"model.lora needs the whole base model, but model.init_from.only="
                                 f"{self.init_from[1]} leaves the other weights random")
            self.hparams['lora'] = self.lora_config.settings()  # every setting recorded, defaults included
            apply_lora(self.model, **self.lora_config.settings())

    # ---------------------------------------------------------------------------- warm start, adapters

    def setup(self, stage):
        # Lightning restores a ckpt_path only after setup, so a resumed run must say so beforehand: xlab and
        # load_checkpoint set init_from_done. (trainer.fit(model, ckpt_path=...) on a model fresh from its
        # constructor reads init_from too, then the checkpoint's weights replace those.)
        if self.init_from is not None and not self.init_from_done:
            self.apply_init_from()

    def apply_init_from(self):
        """Copy the ``init_from`` weights into the model (``xlabml.init_from.copy_weights``), after checking the
        trainer's data module's tokenizer against the one they were trained with (when the embedding or the head
        is copied); for a LoRA model, record the base's path and weights hash. Called by ``setup`` at the start of
        a run without ``ckpt_path``."""
        from .checkpoints import check_tokenizer, warn
        from .init_from import copy_weights, read_source, token_indexed
        from .lora import weights_hash

        path, only = self.init_from
        source = read_source(path)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        tokenizer = getattr(datamodule, 'tokenizer', None)
        recorded, indexed = source.tokenizer, token_indexed(only)  # indexed: rows are the source tokenizer's ids
        if indexed and recorded.get('tokenizer_hash') and tokenizer is not None:
            check_tokenizer(tokenizer, recorded['tokenizer_hash'], recorded.get('tokenizer_path'), path)
        elif indexed and not recorded.get('tokenizer_hash'):
            what = f"that the data's tokenizer {tokenizer.path}" if tokenizer is not None else "the tokenizer"
            warn(f"model.init_from {path} records no tokenizer hash (a Hugging Face model, or weights imported "
                 f"without an XLab tokenizer): cannot check {what} is the one its weights were trained with")
        copy_weights(self, source, only)
        if self.lora_config is not None:
            # the identity of the weights as the file stores them, whatever dtype a run casts the model to
            self.lora_base = {'path': str(Path(path).resolve()), 'hash': weights_hash(source.weights)}
        self.init_from_done = True

    def on_save_checkpoint(self, checkpoint):
        """A LoRA run's checkpoint keeps the adapters only, and the base's path and weights hash."""
        super().on_save_checkpoint(checkpoint)  # the segment memory and the objective's state (DPO)
        if self.lora_config is None:
            return
        from .checkpoints import LORA_KEY
        from .lora import adapter_keys

        if self.lora_base is None:
            raise ValueError("a LoRA model's checkpoint refers to its base weights, but none were loaded: start "
                             "the run with model.init_from (or from a LoRA checkpoint with ckpt_path)")
        keys = set(adapter_keys(self))
        checkpoint['state_dict'] = {k: v for k, v in checkpoint['state_dict'].items() if k in keys}
        checkpoint[LORA_KEY] = dict(self.lora_base)

    def on_load_checkpoint(self, checkpoint):
        """A LoRA checkpoint (adapters only): the base weights come from its recorded base, checked by hash."""
        from .checkpoints import LORA_KEY, lora_state_dict

        super().on_load_checkpoint(checkpoint)  # the segment memory and the objective's state (DPO)
        if checkpoint.get(LORA_KEY):
            path = self.trainer.ckpt_path if self._trainer is not None else 'the checkpoint'
            checkpoint['state_dict'], self.lora_base = lora_state_dict(self, checkpoint, path)
        self.init_from_done = True

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
