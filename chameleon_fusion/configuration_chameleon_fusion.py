"""Configurations: the early-fusion decoder and its VQ-VAE image tokenizer."""

from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

QK_NORMS = ("layernorm", "rmsnorm", "l2", None)
QUANTIZERS = ("vq", "ema", "fsq")

# Every Auto class the model answers to, so that a saved checkpoint loads with trust_remote_code through any.
_GENERATION_CLASS = "modeling_chameleon_fusion.ChameleonFusionForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_chameleon_fusion.ChameleonFusionConfig",
    "AutoModel": "modeling_chameleon_fusion.ChameleonFusionModel",
    "AutoModelForCausalLM": _GENERATION_CLASS,
    "AutoModelForMultimodalLM": _GENERATION_CLASS,
    "AutoModelForImageTextToText": _GENERATION_CLASS,
}


class ChameleonFusionConfig(PreTrainedConfig):
    r"""
    The decoder of an early-fusion model: one vocabulary of text ids, special ids and image-code ids.

    Besides the usual decoder fields:
        qk_norm: "layernorm" (Chameleon's per-head LayerNorm with weight and bias of shape (heads, head_dim)),
            "rmsnorm", "l2" (unit q/k with a learnable per-head temperature) or None.
        swin_norm: Chameleon-34B's placement, norm after attention/MLP inside the residual branch.
        residual_dropout: dropout applied after every residual add.
        last_block_skip_norm: an extra RMSNorm on the skip connection of the last block.
        z_loss_coefficient: weight of the z-loss, mean(logsumexp(logits)^2) over labelled positions.
        text_vocab_size, boi/eoi/image_token_id, image_seq_length, image_codebook_size: the vocabulary layout.
        image_token_offset: image code k has token id offset + k (new models; default: right after the
            special ids); image_token_ids: an explicit list, code k -> image_token_ids[k] (converted models).
    """

    model_type = "chameleon_fusion"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int | None = None
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    qk_norm: str | None = "layernorm"
    qk_norm_eps: float = 1e-5
    swin_norm: bool = False
    residual_dropout: float | int = 0.0
    last_block_skip_norm: bool = False
    z_loss_coefficient: float | int = 0.0
    text_vocab_size: int = 65536
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    image_token_id: int | None = None
    image_seq_length: int = 1024
    image_codebook_size: int = 8192
    image_token_offset: int | None = None
    image_token_ids: list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.image_token_ids is None and self.image_token_offset is None:
            self.image_token_offset = self.text_vocab_size + len(self._special_ids())
        if self.vocab_size is None:
            self.vocab_size = self._default_vocab_size()
        self._validate()
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    def _special_ids(self) -> set[int]:
        names = ("bos_token_id", "eos_token_id", "pad_token_id", "boi_token_id", "eoi_token_id", "image_token_id")
        ids = set()
        for name in names:
            value = getattr(self, name)
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return {i for i in ids if i >= self.text_vocab_size}

    def _default_vocab_size(self) -> int:
        if self.image_token_ids is not None:
            return max(max(self.image_token_ids), self.text_vocab_size - 1, *self._special_ids()) + 1
        return self.image_token_offset + self.image_codebook_size

    def _validate(self):
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.image_token_ids is not None and len(self.image_token_ids) != self.image_codebook_size:
            raise ValueError(
                f"image_token_ids has {len(self.image_token_ids)} entries but image_codebook_size is "
                f"{self.image_codebook_size}"
            )
        last_image_id = (
            max(self.image_token_ids) if self.image_token_ids is not None
            else self.image_token_offset + self.image_codebook_size - 1
        )
        if last_image_id >= self.vocab_size:
            raise ValueError(f"vocab_size ({self.vocab_size}) is too small for image token id {last_image_id}")


class ChameleonFusionVQVAEConfig(PreTrainedConfig):
    r"""
    The VQGAN-family image tokenizer (encoder, quantizer, decoder).

    Spatial downsampling is 2 ** (len(channel_multiplier) - 1); an image becomes
    (resolution / downsampling) ** 2 codes from `codebook_size`. Chameleon's own tokenizer is the default.
        quantizer: "vq" (codebook + commitment loss), "ema" (EMA codebook updates) or "fsq" (finite scalar
            quantization with `fsq_levels`; codebook_size is their product).
        decoder_trained: False when only the encoder side is known (e.g. converted from transformers'
            ChameleonVQVAE, which has no decoder); decoding then warns that the pixels are meaningless.
        dead_code_threshold: codes used fewer times than this per training batch (an EMA of their counts)
            are moved onto random encoder outputs of the batch; 0 turns the reset off.
        norm_num_groups: GroupNorm groups in every block (32 in taming's VQGAN and Chameleon).
        reconstruction_loss: "l1" or "l2", the pixel term of `forward`'s loss.
    """

    model_type = "chameleon_fusion_vqvae"

    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: list[int] | tuple[int, ...] | None = ()
    mid_attention: bool = True
    latent_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 8192
    dropout: float | int = 0.0
    quantizer: str = "vq"
    commitment_beta: float | int = 0.25
    ema_decay: float | int = 0.99
    dead_code_threshold: float | int = 0.0
    fsq_levels: list[int] | tuple[int, ...] | None = None
    decoder_trained: bool = True
    norm_num_groups: int = 32
    reconstruction_loss: str = "l1"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.channel_multiplier = list(self.channel_multiplier)
        self.attn_resolutions = list(self.attn_resolutions or [])
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer == "fsq":
            if not self.fsq_levels:
                raise ValueError("quantizer='fsq' needs fsq_levels, e.g. [8, 5, 5, 5]")
            self.fsq_levels = list(self.fsq_levels)
            self.codebook_size = _product(self.fsq_levels)
        downsampling = 2 ** (len(self.channel_multiplier) - 1)
        if self.resolution % downsampling:
            raise ValueError(f"resolution ({self.resolution}) must be divisible by the downsampling {downsampling}")
        widths = [self.base_channels * m for m in self.channel_multiplier]
        if any(width % self.norm_num_groups for width in widths):
            raise ValueError(f"every block width {widths} must be divisible by norm_num_groups ({self.norm_num_groups})")
        if self.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {self.reconstruction_loss!r}")
        super().__post_init__(**kwargs)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def latent_size(self) -> int:
        """Codes per side of an image; an image is `latent_size ** 2` tokens."""
        return self.resolution // self.downsampling


def _product(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result


__all__ = ["ChameleonFusionConfig", "ChameleonFusionVQVAEConfig"]
