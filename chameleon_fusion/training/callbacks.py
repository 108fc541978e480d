"""A TrainerCallback that adds per-modality losses and QK-Norm health to every training log."""

import math

import torch
from transformers import TrainerCallback

from ..modeling_chameleon_fusion import ChameleonFusionAttention
from ..vocabulary import Vocabulary

# running sums over the steps since the last log, in this order
TEXT_LOSS, TEXT_TOKENS, IMAGE_LOSS, IMAGE_TOKENS, Z_LOSS, LABELLED_TOKENS = range(6)
LOGIT_BLOCK_ELEMENTS = 2**26  # attention logits materialized at once while measuring their maximum


class EarlyFusionLoggingCallback(TrainerCallback):
    """Adds text_loss, image_loss, z_loss, image_token_share and attention_logit_max/layer_N to each training log.

    Losses are token-weighted means over every batch since the previous log (all processes); the attention
    logit is the largest pre-softmax q.k * scaling a query may attend to, measured on the batches of logging
    steps only (every step when logging per epoch). Put it first with `attach(trainer)` so that the reporters
    (`report_to`: TensorBoard, W&B, ...) and `trainer.state.log_history` receive the values.
    """

    def __init__(self, attention_logits: bool = True):
        self.attention_logits = attention_logits
        self._hooks, self._inputs, self._measure = [], {}, False

    def attach(self, trainer):
        """Insert this callback before the reporters of `trainer`; returns the trainer."""
        trainer.callback_handler.callbacks.insert(0, self)
        return trainer

    # --- hooks --------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._remove_hooks()
        self.vocabulary = _find_vocabulary(model)
        self.layers = [m for m in model.modules() if isinstance(m, ChameleonFusionAttention)]
        self.device = args.device
        self._reset()
        self._hooks.append(model.register_forward_pre_hook(self._remember_inputs, with_kwargs=True))
        self._hooks.append(model.register_forward_hook(self._add_losses))
        if self.attention_logits:
            for position, layer in enumerate(self.layers):
                hook = _AttentionLogitHook(self, position)
                self._hooks.append(layer.register_forward_hook(hook, with_kwargs=True))

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()

    def on_step_begin(self, args, state, control, **kwargs):
        self._measure = self.attention_logits and _logs_at(args, state, state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self._measure = False

    def _remove_hooks(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _reset(self):
        self._sums = torch.zeros(6, device=self.device)
        self._attention_max = torch.full((len(self.layers),), -math.inf, device=self.device)
        self._forwards = 0

    def _remember_inputs(self, module, args, kwargs):
        self._inputs = kwargs

    def _add_losses(self, module, args, output):
        labels = self._inputs.get("labels")
        if not module.training or labels is None or getattr(output, "z_loss", None) is None:
            return
        with torch.no_grad():
            targets = labels[:, 1:]
            labelled = targets != -100
            is_image = self.vocabulary.is_image_token(targets) & labelled
            image_tokens, labelled_tokens = is_image.sum(), labelled.sum()
            denominator = self._inputs.get("num_items_in_batch")
            if denominator is None:
                denominator = labelled_tokens.clamp(min=1)
            step = torch.zeros_like(self._sums)
            step[TEXT_TOKENS], step[IMAGE_TOKENS] = labelled_tokens - image_tokens, image_tokens
            step[LABELLED_TOKENS] = labelled_tokens
            if output.text_loss is not None:
                step[TEXT_LOSS] = output.text_loss.detach() * step[TEXT_TOKENS]
            if output.image_loss is not None:
                step[IMAGE_LOSS] = output.image_loss.detach() * image_tokens
            step[Z_LOSS] = output.z_loss.detach() * torch.as_tensor(denominator, device=step.device)
            self._sums += step.to(self._sums.device)
        self._forwards += 1

    # --- logging ------------------------------------------------------------------------------------------------

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._forwards == 0:
            return
        sums, attention_max = self._sums.clone(), self._attention_max.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(attention_max, op=torch.distributed.ReduceOp.MAX)
        values = _window_values(sums.tolist(), attention_max.tolist())
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        self._reset()


def _window_values(sums: list[float], attention_max: list[float]) -> dict[str, float]:
    values = {}
    if sums[TEXT_TOKENS]:
        values["text_loss"] = sums[TEXT_LOSS] / sums[TEXT_TOKENS]
    if sums[IMAGE_TOKENS]:
        values["image_loss"] = sums[IMAGE_LOSS] / sums[IMAGE_TOKENS]
    if sums[LABELLED_TOKENS]:
        values["z_loss"] = sums[Z_LOSS] / sums[LABELLED_TOKENS]
        values["image_token_share"] = sums[IMAGE_TOKENS] / sums[LABELLED_TOKENS]
    for layer, value in enumerate(attention_max):
        if value > -math.inf:
            values[f"attention_logit_max/layer_{layer}"] = value
    return values


class _AttentionLogitHook:
    """Forward hook of one attention module: the largest allowed logit of the batch, while measuring."""

    def __init__(self, callback: EarlyFusionLoggingCallback, position: int):
        self.callback, self.position = callback, position

    def __call__(self, module, args, kwargs, output):
        callback = self.callback
        if not callback._measure or not module.training:
            return
        hidden_states = args[0] if args else kwargs["hidden_states"]
        position_embeddings = args[1] if len(args) > 1 else kwargs["position_embeddings"]
        with torch.no_grad():
            value = max_attention_logit(module, hidden_states, position_embeddings, callback._inputs.get("attention_mask"))
        maxima = callback._attention_max
        maxima[self.position] = torch.maximum(maxima[self.position], value.to(maxima.device))


def max_attention_logit(attention, hidden_states, position_embeddings, attention_mask=None) -> torch.Tensor:
    """The largest q.k * scaling over (query, key) pairs a query may attend to: causal, padding excluded."""
    query, key, _ = attention.project_qkv(hidden_states, position_embeddings)
    key = key.repeat_interleave(attention.num_key_value_groups, dim=2)
    query, key = query.float().transpose(1, 2), key.float().transpose(1, 2)  # (batch, heads, seq, head_dim)
    batch, heads, seq, _ = query.shape
    valid = torch.ones(batch, seq, dtype=torch.bool, device=query.device)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        valid = attention_mask[:, -seq:].bool().to(query.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
    best = torch.tensor(-math.inf, device=query.device)
    block = max(1, LOGIT_BLOCK_ELEMENTS // (batch * heads * seq))
    for start in range(0, seq, block):
        stop = min(start + block, seq)
        logits = query[:, :, start:stop] @ key.transpose(-1, -2) * attention.scaling
        allowed = causal[None, start:stop] & valid[:, start:stop, None] & valid[:, None, :]
        best = torch.maximum(best, logits.masked_fill(~allowed[:, None], -math.inf).amax())
    return best


def _find_vocabulary(model) -> Vocabulary:
    for module in model.modules():
        if isinstance(getattr(module, "vocabulary", None), Vocabulary):
            return module.vocabulary
    raise TypeError(f"EarlyFusionLoggingCallback needs a ChameleonFusion model; {type(model).__name__} has no vocabulary")


def _logs_at(args, state, step: int) -> bool:
    """Whether Trainer will log after optimizer step `step`."""
    if step == 1 and args.logging_first_step:
        return True
    if args.logging_strategy == "steps":
        return step % state.logging_steps == 0
    return args.logging_strategy != "no"
