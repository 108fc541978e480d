"""Load transformers' ChameleonVQVAE (encoder, quant_conv, codebook) into ChameleonFusionVQVAE.

The module layouts are the same, so weights copy key for key. transformers ships no decoder: the result
has `config.decoder_trained=False` and its `decode` warns.
"""

import torch

from ..configuration_chameleon_fusion import ChameleonFusionVQVAEConfig
from ..modeling_vqvae import ChameleonFusionVQVAE

# prefixes under which a full ChameleonForConditionalGeneration / ChameleonModel checkpoint keeps the VQ model
VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")
# our keys with no counterpart in transformers' model: the decoder and the quantizer's training statistics
EXPECTED_MISSING = ("decoder.", "quantize.code_usage", "quantize.embed_sum")


def config_from_transformers(tf_config) -> ChameleonFusionVQVAEConfig:
    """transformers' ChameleonVQVAEConfig -> ours (decoder_trained=False)."""
    if tf_config.double_latent:
        raise ValueError("double_latent=True (a Gaussian latent) has no counterpart in ChameleonFusionVQVAE")
    has_attention = tf_config.attn_type == "vanilla"
    return ChameleonFusionVQVAEConfig(
        resolution=tf_config.resolution,
        in_channels=tf_config.in_channels,
        base_channels=tf_config.base_channels,
        channel_multiplier=list(tf_config.channel_multiplier),
        num_res_blocks=tf_config.num_res_blocks,
        attn_resolutions=list(tf_config.attn_resolutions or []) if has_attention else [],
        mid_attention=has_attention,
        latent_channels=tf_config.latent_channels,
        embed_dim=tf_config.embed_dim,
        codebook_size=tf_config.num_embeddings,
        dropout=tf_config.dropout,
        quantizer="vq",
        commitment_beta=getattr(tf_config, "beta", 0.25),
        decoder_trained=False,
    )


def _vq_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keeps the VQ part of a (possibly full-model) checkpoint, without its prefix."""
    for prefix in VQ_PREFIXES:
        if any(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return dict(state_dict)


def load_transformers_chameleon_vqvae(
    source, config=None, dtype: torch.dtype | None = None
) -> ChameleonFusionVQVAE:
    """A ChameleonVQVAE model, or its state dict plus its config, -> ChameleonFusionVQVAE (eval mode).

    `config` may be transformers' ChameleonVQVAEConfig or ours. Raises ValueError on any unexpected key
    or any missing key besides the decoder and the quantizer's training statistics.
    """
    if isinstance(source, torch.nn.Module):
        config = config if config is not None else source.config
        state_dict = source.state_dict()
    elif isinstance(source, dict):
        if config is None:
            raise ValueError("loading from a state dict needs `config` (transformers' ChameleonVQVAEConfig or ours)")
        state_dict = source
    else:
        raise TypeError(f"source must be a ChameleonVQVAE model or a state dict, got {type(source).__name__}")
    config = config_from_transformers(config) if not isinstance(config, ChameleonFusionVQVAEConfig) else config
    state_dict = _vq_state_dict(state_dict)
    has_decoder = any(key.startswith("decoder.") for key in state_dict)
    model = ChameleonFusionVQVAE(ChameleonFusionVQVAEConfig(**{**config.to_dict(), "decoder_trained": has_decoder}))
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"checkpoint does not match the config: {error}") from None
    allowed = EXPECTED_MISSING[1:] if has_decoder else EXPECTED_MISSING
    missing = [key for key in missing if not key.startswith(allowed)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the config: missing keys {missing}, unexpected keys {unexpected}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


__all__ = ["config_from_transformers", "load_transformers_chameleon_vqvae"]
