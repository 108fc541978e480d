"""Meta's Chameleon / Anole release layout -> ours, with the VQ decoder, reading tensors only (weights_only=True).

Layout: params.json (+ consolidate_params.json), consolidated*.pth shards, and a tokenizer folder holding
text_tokenizer.json, vqgan.ckpt and vqgan.yaml (either inside SRC, or SRC/../../tokenizer as in Meta's download).
Meta's rotary embedding pairs neighbouring channels; ours (like transformers') pairs channel i with i + head_dim/2,
so the rows of wq/wk and the QK-Norm affine are permuted within each head.
"""

import json
import pickle
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from ..configuration_chameleon_fusion import ChameleonFusionConfig, ChameleonFusionVQVAEConfig
from ..image_processing_chameleon_fusion import ChameleonFusionImageProcessor
from ..modeling_vqvae import ChameleonFusionVQVAE
from ..processing_chameleon_fusion import ChameleonFusionProcessor
from .checkpoint import build_model_strictly, fuse_decoder_state, image_token_map_from_vocab, save_and_verify
from .hf_chameleon import CHAMELEON_BOI, CHAMELEON_EOI, CHAMELEON_IMAGE

RESERVED_IMAGE_TOKEN = "<reserved08707>"  # the reserved token Chameleon's tokenizer uses as the image placeholder


def convert_from_meta(source, destination=None):
    """A Meta-layout Chameleon/Anole folder -> our (model, processor) with a trained VQ decoder."""
    params_file, tokenizer_folder = locate_meta_files(Path(source))
    params = read_params(params_file)
    shards = [load_tensors(path) for path in sorted(params_file.parent.glob("consolidated*.pth"))]
    if not shards:
        raise FileNotFoundError(f"no consolidated*.pth next to {params_file}")
    processor = meta_processor(tokenizer_folder)
    state = meta_decoder_state(shards, params)
    embeddings = state["model.embed_tokens.weight"]
    config = ChameleonFusionConfig(
        **{**processor.vocabulary.layout(), "vocab_size": embeddings.shape[0]},
        hidden_size=embeddings.shape[1],
        intermediate_size=state["model.layers.0.mlp.gate_proj.weight"].shape[0],
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": params.get("rope_theta", 10000.0)},
        max_position_embeddings=16384 if params.get("rope_theta", 10000.0) > 10000.0 else 4096,
        swin_norm=params.get("swin_norm", False),
        qk_norm="layernorm" if params.get("qk_normalization", True) else None,
        qk_norm_eps=1e-5,
    )
    model = build_model_strictly(config, fuse_decoder_state(state, config.num_hidden_layers))
    if destination is not None:
        save_and_verify(model, processor, destination)
    return model, processor


def locate_meta_files(source: Path) -> tuple[Path, Path]:
    """params.json (in SRC or one SRC/models/<size>/) and the tokenizer folder (SRC/tokenizer or two levels up)."""
    candidates = [source / "params.json"] if (source / "params.json").exists() else sorted(source.glob("models/*/params.json"))
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"expected one params.json in {source} or {source}/models/<size>/, found {len(candidates)}; "
            "pass the folder of one model"
        )
    params_file = candidates[0]
    for folder in (source / "tokenizer", params_file.parent / "tokenizer", params_file.parent.parent.parent / "tokenizer"):
        if (folder / "text_tokenizer.json").exists():
            return params_file, folder
    raise FileNotFoundError(f"no tokenizer/text_tokenizer.json found next to {source}")


def read_params(params_file: Path) -> dict:
    params = json.loads(params_file.read_text())
    consolidated = params_file.parent / "consolidate_params.json"
    if consolidated.exists():
        params.update(json.loads(consolidated.read_text()))
    return {**params, **params.get("model", {})}


def load_tensors(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds objects other than tensors; it is not unpickled for safety ({error})") from None


def rotate_half_order(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's channels from Meta's interleaved rotary pairs to the rotate-half pairs (dim 0)."""
    rows = tensor.shape[0]
    head_dim = rows // num_heads
    return tensor.reshape(num_heads, head_dim // 2, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def meta_decoder_state(shards: list[dict], params: dict) -> dict[str, torch.Tensor]:
    """Model-parallel shards in Meta's names -> one state dict in transformers' Chameleon names and channel order."""
    count, heads = len(shards), params["n_heads"]
    kv_heads = params.get("n_kv_heads") or heads
    if heads % count or kv_heads % count:
        raise ValueError(f"{count} shards do not divide n_heads={heads} and n_kv_heads={kv_heads}")
    state = {
        "model.embed_tokens.weight": torch.cat([s["tok_embeddings.weight"] for s in shards], dim=1),
        "model.norm.weight": shards[0]["norm.weight"],
        "lm_head.weight": torch.cat([s["output.weight"] for s in shards], dim=0),
    }
    for i in range(params["n_layers"]):
        state.update(_meta_layer(shards, f"layers.{i}.", f"model.layers.{i}.", heads // count, kv_heads // count))
    return state


def _meta_layer(shards, meta: str, ours: str, local_heads: int, local_kv_heads: int) -> dict[str, torch.Tensor]:
    q, k, v = zip(*(_split_qkv(s, meta, local_heads, local_kv_heads) for s in shards))
    gate, up = zip(*(_split_w13(s, meta) for s in shards))
    heads, kv_heads = local_heads * len(shards), local_kv_heads * len(shards)
    layer = {
        "self_attn.q_proj.weight": rotate_half_order(torch.cat(q), heads),
        "self_attn.k_proj.weight": rotate_half_order(torch.cat(k), kv_heads),
        "self_attn.v_proj.weight": torch.cat(v),
        "self_attn.o_proj.weight": torch.cat([s[meta + "attention.wo.weight"] for s in shards], dim=1),
        "mlp.gate_proj.weight": torch.cat(gate),
        "mlp.up_proj.weight": torch.cat(up),
        "mlp.down_proj.weight": torch.cat([s[meta + "feed_forward.w2.weight"] for s in shards], dim=1),
        "input_layernorm.weight": shards[0][meta + "attention_norm.weight"],
        "post_attention_layernorm.weight": shards[0][meta + "ffn_norm.weight"],
    }
    for name, local in (("q", local_heads), ("k", local_kv_heads)):
        for part in ("weight", "bias"):
            key = f"{meta}attention.{name}_normalization.{part}"
            if key in shards[0]:  # one LayerNorm(head_dim) per shard, shared by that shard's heads
                per_head = torch.cat([s[key].unsqueeze(0).expand(local, -1) for s in shards])
                layer[f"self_attn.{name}_norm.{part}"] = rotate_half_order(per_head.flatten(), len(per_head)).view_as(per_head)
    return {ours + key: value for key, value in layer.items()}


def _split_qkv(shard, meta, local_heads, local_kv_heads):
    if meta + "attention.wqkv.weight" in shard:
        head_dim = shard[meta + "attention.wo.weight"].shape[1] // local_heads
        sizes = (local_heads * head_dim, local_kv_heads * head_dim, local_kv_heads * head_dim)
        return shard[meta + "attention.wqkv.weight"].split(sizes)
    return tuple(shard[f"{meta}attention.w{name}.weight"] for name in "qkv")


def _split_w13(shard, meta):
    if meta + "feed_forward.w13.weight" in shard:
        return shard[meta + "feed_forward.w13.weight"].chunk(2)
    return shard[meta + "feed_forward.w1.weight"], shard[meta + "feed_forward.w3.weight"]


def meta_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """text_tokenizer.json with its reserved image placeholder named <image>."""
    spec = json.loads((folder / "text_tokenizer.json").read_text(encoding="utf-8"))
    vocab, added = spec["model"]["vocab"], spec.get("added_tokens", [])
    if CHAMELEON_IMAGE not in vocab and all(token["content"] != CHAMELEON_IMAGE for token in added):
        if RESERVED_IMAGE_TOKEN in vocab:
            vocab[CHAMELEON_IMAGE] = vocab.pop(RESERVED_IMAGE_TOKEN)
        for token in added:
            if token["content"] == RESERVED_IMAGE_TOKEN:
                token["content"] = CHAMELEON_IMAGE
    vocab = {**vocab, **{token["content"]: token["id"] for token in added}}
    specials = {name: token for name, token in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<pad>"))
                if token in vocab}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **specials,
                                   clean_up_tokenization_spaces=False)


def meta_vqgan(folder: Path) -> ChameleonFusionVQVAE:
    """vqgan.yaml + vqgan.ckpt (taming layout) -> our VQ-VAE, decoder included."""
    params = yaml.safe_load((folder / "vqgan.yaml").read_text())["model"]["params"]
    layout = params["ddconfig"]
    if layout.get("double_z"):
        raise ValueError("vqgan.yaml has double_z=True (a Gaussian latent), which this VQ-VAE does not model")
    config = ChameleonFusionVQVAEConfig(
        resolution=layout["resolution"], in_channels=layout["in_channels"], base_channels=layout["ch"],
        channel_multiplier=list(layout["ch_mult"]), num_res_blocks=layout["num_res_blocks"],
        attn_resolutions=list(layout.get("attn_resolutions") or []), latent_channels=layout["z_channels"],
        embed_dim=params["embed_dim"], codebook_size=params["n_embed"], dropout=layout.get("dropout", 0.0),
    )
    checkpoint = load_tensors(folder / "vqgan.ckpt")
    state = checkpoint.get("state_dict", checkpoint)
    state = {key: value for key, value in state.items() if not key.startswith("loss.")}  # the GAN discriminator
    model = ChameleonFusionVQVAE(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith(("quantize.code_usage", "quantize.embed_sum"))]
    if missing or unexpected:
        raise ValueError(f"vqgan.ckpt does not match vqgan.yaml: missing keys {missing}, unexpected keys {unexpected}")
    return model.eval()


def meta_processor(folder: Path) -> ChameleonFusionProcessor:
    tokenizer = meta_tokenizer(folder)
    vq = meta_vqgan(folder)
    return ChameleonFusionProcessor(
        ChameleonFusionImageProcessor(size=vq.config.resolution, resample="lanczos"),
        tokenizer,
        vq_model=vq,
        image_token_map=image_token_map_from_vocab(tokenizer.get_vocab(), vq.config.codebook_size),
        image_token=CHAMELEON_IMAGE,
        boi_token=CHAMELEON_BOI,
        eoi_token=CHAMELEON_EOI,
    )
