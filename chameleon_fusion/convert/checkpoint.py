"""What every conversion shares: decoder tensors in Chameleon's (unfused) layout <-> ours, strict loading, saving."""

import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.initialization import no_init_weights

from ..configuration_chameleon_fusion import ChameleonFusionConfig
from ..modeling_chameleon_fusion import ChameleonFusionForConditionalGeneration

# per-layer tensors of transformers' Chameleon that ours keeps under the same name
SAME_NAME_LAYER_KEYS = (
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.q_norm.bias",
    "self_attn.k_norm.weight",
    "self_attn.k_norm.bias",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
TOP_LEVEL_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def fuse_decoder_state(chameleon: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers' Chameleon decoder tensors (q/k/v and gate/up separate) -> ours (fused qkv_proj, gate_up_proj)."""
    ours = {key: chameleon[key] for key in TOP_LEVEL_KEYS if key in chameleon}
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        ours.update({prefix + key: chameleon[prefix + key] for key in _same_name_keys(chameleon, prefix)})
        for suffix in ("weight", "bias"):
            parts = [f"{prefix}self_attn.{name}_proj.{suffix}" for name in "qkv"]
            if parts[0] in chameleon:
                ours[f"{prefix}self_attn.qkv_proj.{suffix}"] = torch.cat([chameleon[key] for key in parts])
            parts = [f"{prefix}mlp.{name}_proj.{suffix}" for name in ("gate", "up")]
            if parts[0] in chameleon:
                ours[f"{prefix}mlp.gate_up_proj.{suffix}"] = torch.cat([chameleon[key] for key in parts])
    _refuse_leftovers(chameleon, num_layers)
    return ours


def _refuse_leftovers(chameleon: dict, num_layers: int) -> None:
    """Every source tensor must have a place in ours: anything else is an unexpected key, not silently dropped."""
    known = set(TOP_LEVEL_KEYS)
    for i in range(num_layers):
        for key in (*SAME_NAME_LAYER_KEYS, "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"):
            known.update({f"model.layers.{i}.{key}", f"model.layers.{i}.{key[:-len('weight')]}bias"})
    unexpected = sorted(set(chameleon) - known)
    if unexpected:
        raise ValueError(f"conversion does not cover the checkpoint: unexpected keys {unexpected}")


def split_decoder_state(ours: dict[str, torch.Tensor], config: ChameleonFusionConfig) -> dict[str, torch.Tensor]:
    """Our decoder tensors -> transformers' Chameleon layout (the inverse of fuse_decoder_state)."""
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    chameleon = {key: ours[key] for key in TOP_LEVEL_KEYS if key in ours}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        chameleon.update({prefix + key: ours[prefix + key] for key in _same_name_keys(ours, prefix)})
        for suffix in ("weight", "bias"):
            if f"{prefix}self_attn.qkv_proj.{suffix}" in ours:
                q, k, v = ours[f"{prefix}self_attn.qkv_proj.{suffix}"].split((q_size, kv_size, kv_size))
                for name, part in zip("qkv", (q, k, v)):
                    chameleon[f"{prefix}self_attn.{name}_proj.{suffix}"] = part.clone()
            if f"{prefix}mlp.gate_up_proj.{suffix}" in ours:
                gate, up = ours[f"{prefix}mlp.gate_up_proj.{suffix}"].chunk(2)
                chameleon[f"{prefix}mlp.gate_proj.{suffix}"] = gate.clone()
                chameleon[f"{prefix}mlp.up_proj.{suffix}"] = up.clone()
    return chameleon


def _same_name_keys(state: dict, prefix: str) -> list[str]:
    """The layer's tensors that keep their name (norms, o_proj, down_proj, and their biases when present)."""
    return [key for key in SAME_NAME_LAYER_KEYS if prefix + key in state] + [
        key.replace(".weight", ".bias") for key in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
        if prefix + key.replace(".weight", ".bias") in state
    ]


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a folder (single file or shards); pickles are never read."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else "no such folder"
        raise FileNotFoundError(f"no .safetensors weights in {folder} (found: {found}); pickled weights are not read")
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def build_model_strictly(config: ChameleonFusionConfig, state: dict[str, torch.Tensor]):
    """Our model holding exactly `state`: any missing or unexpected key is a ValueError."""
    dtype = next(iter(state.values())).dtype
    with no_init_weights():
        model = ChameleonFusionForConditionalGeneration(config)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"conversion does not cover the model: missing keys {missing}, unexpected keys {unexpected}")
    return model.to(dtype).eval()


def save_and_verify(model, processor, destination) -> None:
    """Save model (+ generation config) and processor, then reload the model and fail on any key mismatch."""
    os.makedirs(destination, exist_ok=True)
    model.save_pretrained(destination)
    processor.save_pretrained(destination)
    _, info = ChameleonFusionForConditionalGeneration.from_pretrained(destination, output_loading_info=True)
    problems = {name: keys for name, keys in info.items() if keys and name != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ValueError(f"the saved checkpoint in {destination} does not load cleanly: {info}")
    processor.check_model(model)


def chameleon_image_token_name(code: int) -> str:
    """transformers' and Meta's name of image code `code`: its decimal digits spelled A-J, in IMGIMG...Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


def image_token_map_from_vocab(vocab: dict[str, int], codebook_size: int) -> list[int]:
    """The token id of each image code, from a vocabulary that names them IMGIMG...Z."""
    missing = [code for code in range(codebook_size) if chameleon_image_token_name(code) not in vocab]
    if missing:
        raise ValueError(
            f"the vocabulary lacks image tokens for {len(missing)} of {codebook_size} codes (e.g. "
            f"{chameleon_image_token_name(missing[0])}); is this a Chameleon checkpoint?"
        )
    return [vocab[chameleon_image_token_name(code)] for code in range(codebook_size)]
