"""transformers' ChameleonForConditionalGeneration checkpoints <-> ours, exactly (decoder, QK-Norm, vocabulary, VQ)."""

import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonProcessor,
    GenerationConfig,
)
from transformers.initialization import no_init_weights
from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

from ..configuration_chameleon_fusion import ChameleonFusionConfig, ChameleonFusionVQVAEConfig
from ..image_processing_chameleon_fusion import ChameleonFusionImageProcessor
from ..modeling_chameleon_fusion import ChameleonFusionForConditionalGeneration
from ..processing_chameleon_fusion import ChameleonFusionProcessor
from .checkpoint import (
    build_model_strictly,
    chameleon_image_token_name,
    fuse_decoder_state,
    image_token_map_from_vocab,
    read_safetensors_folder,
    save_and_verify,
    split_decoder_state,
)
from .vqgan import load_transformers_chameleon_vqvae

VQ_PREFIX = "model.vqmodel."
CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_IMAGE = "<racm3:break>", "<eoss>", "<image>"
# decoder fields that carry over under the same name
SHARED_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "swin_norm", "vocab_size",
)
UNDECODED_SEED = 0  # transformers ships no VQ decoder: ours starts from this fixed seed, so conversions repeat bitwise


def convert_from_transformers(source, destination=None):
    """A transformers Chameleon folder (safetensors) -> our (model, processor); saved and verified if `destination`."""
    source = Path(source)
    their_config = _read_chameleon_config(source)
    tensors = read_safetensors_folder(source)
    vq_state = {k[len(VQ_PREFIX):]: v for k, v in tensors.items() if k.startswith(VQ_PREFIX)}
    decoder_state = {k: v for k, v in tensors.items() if not k.startswith(VQ_PREFIX)}
    processor = _processor_from_transformers(source, their_config, vq_state)
    config = ChameleonFusionConfig(
        **{**processor.vocabulary.layout(), "vocab_size": their_config.vocab_size},
        **{name: getattr(their_config, name) for name in SHARED_FIELDS if name != "vocab_size"},
        rope_parameters=dict(their_config.rope_parameters),
        qk_norm="layernorm",
        qk_norm_eps=1e-5,  # transformers' ChameleonLayerNorm hard-codes it
    )
    model = build_model_strictly(config, fuse_decoder_state(decoder_state, config.num_hidden_layers))
    if (source / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(source)
    if destination is not None:
        save_and_verify(model, processor, destination)
    return model, processor


def _read_chameleon_config(source: Path) -> ChameleonConfig:
    config_file = source / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{source} has no config.json: not a transformers checkpoint folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "chameleon":
        raise ValueError(f"{source} holds a {model_type!r} model, not transformers' 'chameleon'")
    config = ChameleonConfig.from_pretrained(source)
    if config.vocabulary_map is None:
        raise ValueError(f"{source}/config.json has no vocabulary_map: the image token ids are unknown")
    return config


def _processor_from_transformers(source: Path, their_config: ChameleonConfig, vq_state) -> ChameleonFusionProcessor:
    with torch.random.fork_rng():
        torch.manual_seed(UNDECODED_SEED)
        vq = load_transformers_chameleon_vqvae(vq_state, config=their_config.vq_config)
    resolution = vq.config.resolution
    return ChameleonFusionProcessor(
        ChameleonFusionImageProcessor(size=resolution, resample="lanczos"),
        AutoTokenizer.from_pretrained(source),
        vq_model=vq,
        image_token_map=image_token_map_from_vocab(their_config.vocabulary_map, vq.config.codebook_size),
        image_token=CHAMELEON_IMAGE,
        boi_token=CHAMELEON_BOI,
        eoi_token=CHAMELEON_EOI,
    )


def convert_to_transformers(source, destination):
    """Our checkpoint folder -> transformers' ChameleonForConditionalGeneration folder (the VQ decoder stays behind)."""
    model = ChameleonFusionForConditionalGeneration.from_pretrained(source).eval()
    processor = ChameleonFusionProcessor.from_pretrained(source)
    _check_expressible(model.config, processor)
    their_config = chameleon_config_from_ours(model.config, processor)
    state = split_decoder_state(model.state_dict(), model.config)
    with no_init_weights():
        theirs = ChameleonForConditionalGeneration(their_config)
    vq_keys = theirs.model.vqmodel.state_dict().keys()
    ours_vq = processor.vq_model.state_dict()
    state.update({VQ_PREFIX + key: ours_vq[key] for key in vq_keys if key in ours_vq})
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (their_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"conversion to transformers misses keys {missing}, leaves unexpected keys {unexpected}")
    theirs = theirs.to(model.dtype).eval()
    theirs.generation_config = model.generation_config
    theirs.save_pretrained(destination)
    their_processor = ChameleonProcessor(
        ChameleonImageProcessorPil(size={"shortest_edge": processor.image_processor.size},
                                   crop_size={"height": processor.image_processor.size,
                                              "width": processor.image_processor.size}),
        processor.tokenizer,
        image_seq_length=processor.vocabulary.image_seq_length,
    )
    their_processor.save_pretrained(destination)
    _, info = ChameleonForConditionalGeneration.from_pretrained(destination, output_loading_info=True)
    if any(info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise ValueError(f"the transformers checkpoint in {destination} does not load cleanly: {info}")
    return theirs


def _check_expressible(config: ChameleonFusionConfig, processor) -> None:
    """transformers' Chameleon has fewer switches than ours: refuse what it cannot hold."""
    problems = []
    if config.qk_norm != "layernorm" or config.qk_norm_eps != 1e-5:
        problems.append(f"qk_norm={config.qk_norm!r} (eps {config.qk_norm_eps}); it has only LayerNorm with eps 1e-5")
    if config.last_block_skip_norm:
        problems.append("last_block_skip_norm=True")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append("head_dim * num_attention_heads != hidden_size")
    vq = processor.vq_model.config
    if vq.quantizer == "fsq":
        problems.append("an FSQ image tokenizer (it has only a nearest-codebook quantizer)")
    if getattr(vq, "norm_num_groups", 32) != 32:
        problems.append(f"norm_num_groups={vq.norm_num_groups} in the image tokenizer (it uses 32)")
    if not vq.mid_attention and vq.attn_resolutions:
        problems.append("attention at some resolutions but not in the middle block")
    if problems:
        raise ValueError("this model cannot be written as transformers' Chameleon: " + "; ".join(problems))


def chameleon_config_from_ours(config: ChameleonFusionConfig, processor) -> ChameleonConfig:
    """Our decoder config and processor -> transformers' ChameleonConfig (vocabulary_map names every image code)."""
    vocabulary = processor.vocabulary
    vocabulary_map = dict(processor.tokenizer.get_vocab())
    vocabulary_map.update({chameleon_image_token_name(code): token
                           for code, token in enumerate(vocabulary.code_to_id.tolist())})
    vocabulary_map[CHAMELEON_IMAGE] = vocabulary.image_token_id
    return ChameleonConfig(
        **{name: getattr(config, name) for name in SHARED_FIELDS},
        rope_parameters=dict(config.rope_parameters),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        vq_config=transformers_vq_config(processor.vq_model.config),
        vocabulary_map=vocabulary_map,
    )


def transformers_vq_config(config: ChameleonFusionVQVAEConfig) -> dict:
    """Our VQ-VAE config -> the fields of transformers' ChameleonVQVAEConfig."""
    return {
        "embed_dim": config.embed_dim,
        "num_embeddings": config.codebook_size,
        "double_latent": False,
        "latent_channels": config.latent_channels,
        "resolution": config.resolution,
        "in_channels": config.in_channels,
        "base_channels": config.base_channels,
        "channel_multiplier": list(config.channel_multiplier),
        "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": list(config.attn_resolutions),
        "dropout": config.dropout,
        "attn_type": "vanilla" if config.mid_attention else "none",
    }
