"""The early-fusion decoder: RMSNorm pre-norm, RoPE, QK-Norm attention, SwiGLU, one vocabulary for text and image."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_chameleon_fusion import ChameleonFusionConfig
from .generation import ChameleonFusionGenerationMixin
from .vocabulary import Vocabulary


@dataclass
class ChameleonFusionCausalLMOutput(CausalLMOutputWithPast):
    """Causal LM output plus the loss split by the modality of the label, and the z-loss."""

    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class ChameleonFusionRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # statistics in float32 for any dtype


class ChameleonFusionHeadNorm(nn.Module):
    """QK-Norm of one of q or k: statistics over head_dim, a separate affine for every head."""

    def __init__(self, kind: str, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.kind, self.eps, self.head_dim = kind, eps, head_dim
        if kind == "l2":
            self.temperature = nn.Parameter(torch.full((num_heads, 1), head_dim**0.5))
        else:
            self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        if kind == "layernorm":
            self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, heads, head_dim)."""
        if self.kind == "layernorm":
            return torch.addcmul(self.bias, F.layer_norm(x, (self.head_dim,), eps=self.eps), self.weight)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (self.head_dim,), eps=self.eps) * self.weight
        return F.normalize(x, dim=-1) * self.temperature

    def reset_parameters(self):
        if self.kind == "l2":
            init.constant_(self.temperature, self.head_dim**0.5)
            return
        init.ones_(self.weight)
        if self.kind == "layernorm":
            init.zeros_(self.bias)


class ChameleonFusionRotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions, with the sign of rotate-half folded into sin."""

    def __init__(self, config: ChameleonFusionConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        cos, signed_sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        # (batch, seq, 1, head_dim): broadcast over heads in the (batch, seq, heads, head_dim) layout
        return cos.unsqueeze(2).to(x.dtype), signed_sin.unsqueeze(2).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention: x*cos + rotate_half(x)*sin, with rotate_half as a roll."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention on (batch, heads, seq, head_dim); keys and values shared across GQA groups."""
    if module.num_key_value_groups > 1:
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ChameleonFusionAttention(nn.Module):
    """Self-attention with one fused q/k/v projection and QK-Norm before RoPE."""

    def __init__(self, config: ChameleonFusionConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = 1.0 if config.qk_norm == "l2" else self.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        if config.qk_norm is not None:
            self.q_norm = ChameleonFusionHeadNorm(config.qk_norm, self.num_heads, self.head_dim, config.qk_norm_eps)
            self.k_norm = ChameleonFusionHeadNorm(config.qk_norm, self.num_kv_heads, self.head_dim, config.qk_norm_eps)

    def project_qkv(self, hidden_states, position_embeddings):
        """q, k (normalized, rotated) and v, each (batch, seq, heads, head_dim)."""
        batch, seq, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, seq, -1, self.head_dim)
        query, key, value = qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=2)
        if self.config.qk_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        cos, signed_sin = position_embeddings
        return apply_rotary(query, cos, signed_sin), apply_rotary(key, cos, signed_sin), value

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        query, key, value = (t.transpose(1, 2) for t in self.project_qkv(hidden_states, position_embeddings))
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1)), weights


class ChameleonFusionMLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one matrix."""

    def __init__(self, config: ChameleonFusionConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class ChameleonFusionDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block (norm -> sublayer -> add), or with swin_norm post-norm inside the branch (sublayer -> norm -> add)."""

    def __init__(self, config: ChameleonFusionConfig, layer_idx: int):
        super().__init__()
        self.swin_norm = config.swin_norm
        self.self_attn = ChameleonFusionAttention(config, layer_idx)
        self.mlp = ChameleonFusionMLP(config)
        self.input_layernorm = ChameleonFusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ChameleonFusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        is_last = layer_idx == config.num_hidden_layers - 1
        self.skip_norm = (
            ChameleonFusionRMSNorm(config.hidden_size, config.rms_norm_eps)
            if is_last and config.last_block_skip_norm
            else None
        )
        self.residual_dropout = nn.Dropout(config.residual_dropout) if config.residual_dropout > 0 else None

    def _add(self, skip: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        out = skip + branch
        return self.residual_dropout(out) if self.residual_dropout is not None else out

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        skip = self.skip_norm(hidden_states) if self.skip_norm is not None else hidden_states
        if self.swin_norm:
            attn_out, _ = self.self_attn(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
            hidden_states = self._add(skip, self.input_layernorm(attn_out))
            return self._add(hidden_states, self.post_attention_layernorm(self.mlp(hidden_states)))
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values, **kwargs
        )
        hidden_states = self._add(skip, attn_out)
        return self._add(hidden_states, self.mlp(self.post_attention_layernorm(hidden_states)))


class ChameleonFusionPreTrainedModel(PreTrainedModel):
    config: ChameleonFusionConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChameleonFusionDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": ChameleonFusionDecoderLayer,
        "attentions": ChameleonFusionAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ChameleonFusionHeadNorm):
            module.reset_parameters()


class ChameleonFusionModel(ChameleonFusionPreTrainedModel):
    """The decoder stack: embeddings -> blocks -> final RMSNorm."""

    def __init__(self, config: ChameleonFusionConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            ChameleonFusionDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)
        )
        self.norm = ChameleonFusionRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = ChameleonFusionRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            _check_ids_in_vocabulary(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            position_ids = _default_position_ids(inputs_embeds, attention_mask, past_key_values)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                attention_mask=causal_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class ChameleonFusionForConditionalGeneration(ChameleonFusionPreTrainedModel, ChameleonFusionGenerationMixin):
    """The decoder with its LM head over the whole vocabulary; image logits are never masked."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    output_modalities = ("image", "text")

    def __init__(self, config: ChameleonFusionConfig):
        super().__init__(config)
        self.model = ChameleonFusionModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vocabulary = Vocabulary.from_config(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ChameleonFusionCausalLMOutput:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        losses = {}
        if labels is not None:
            losses = early_fusion_loss(
                logits, labels, self.vocabulary, self.config.z_loss_coefficient, num_items_in_batch
            )
        return ChameleonFusionCausalLMOutput(
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **losses,
        )


def early_fusion_loss(logits, labels, vocabulary, z_loss_coefficient=0.0, num_items_in_batch=None):
    """Next-token cross-entropy over labelled positions (-100 = ignored), split by the label's modality.

    Returns loss (mean CE, plus z_loss_coefficient * z_loss), text_loss and image_loss (mean CE over
    positions whose label is / is not an image code; None when there are none) and z_loss
    (mean logsumexp(logits)^2).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    labels = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    logits = logits.float()
    valid = labels != -100
    token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    # log Z = cross-entropy + the label's logit: no second pass over the vocabulary (nor its gradient when unused)
    with torch.set_grad_enabled(torch.is_grad_enabled() and z_loss_coefficient != 0):
        log_z = token_loss + logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    denominator = valid.sum() if num_items_in_batch is None else num_items_in_batch
    denominator = torch.as_tensor(denominator, device=logits.device).clamp(min=1)
    z_loss = (log_z.square() * valid).sum() / denominator
    is_image = vocabulary.is_image_token(labels) & valid
    return {
        "loss": token_loss.sum() / denominator + z_loss_coefficient * z_loss,
        "text_loss": _masked_mean(token_loss, valid & ~is_image),
        "image_loss": _masked_mean(token_loss, is_image),
        "z_loss": z_loss,
    }


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    count = mask.sum()
    return (values * mask).sum() / count if bool(count) else None


def _default_position_ids(inputs_embeds, attention_mask, past_key_values) -> torch.Tensor:
    """Positions that skip left padding (from a 2D mask), else positions counted from the cache length."""
    seq = inputs_embeds.shape[1]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
    past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
    return (torch.arange(seq, device=inputs_embeds.device) + past_seen).unsqueeze(0)


def _check_ids_in_vocabulary(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.device.type != "cpu" or not input_ids.numel() or torch.compiler.is_compiling():
        return  # accelerators report out-of-range ids themselves; a check here would synchronize every step
    low, high = torch.aminmax(input_ids)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}); got values in [{int(low)}, {int(high)}]")


__all__ = [
    "ChameleonFusionPreTrainedModel",
    "ChameleonFusionModel",
    "ChameleonFusionForConditionalGeneration",
    "ChameleonFusionCausalLMOutput",
    "early_fusion_loss",
]
