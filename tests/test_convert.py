"""Exact conversion: transformers' Chameleon <-> ours, and Meta's release layout -> ours (checked against its math)."""

import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tiny import tiny_tokenizer, tiny_vq
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from chameleon_fusion.cli import main as cli_main
from chameleon_fusion.convert.checkpoint import chameleon_image_token_name
from chameleon_fusion.convert.hf_chameleon import convert_from_transformers, convert_to_transformers
from chameleon_fusion.convert.meta_chameleon import RESERVED_IMAGE_TOKEN, convert_from_meta
from chameleon_fusion.processing_chameleon_fusion import ChameleonFusionProcessor

CODEBOOK = 32
VQ = dict(resolution=16, base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1, latent_channels=16,
          embed_dim=16, num_embeddings=CODEBOOK)
SIZES = {
    "gqa": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "swin": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, swin_norm=True),
    "odd": dict(hidden_size=72, intermediate_size=100, num_attention_heads=3, num_key_value_heads=1),
}


def chameleon_tokenizer():
    """A tiny BPE with Chameleon's special names and one IMGIMG...Z token per image code."""
    tokenizer = tiny_tokenizer(boi_token="<racm3:break>", eoi_token="<eoss>")
    tokenizer.add_tokens([chameleon_image_token_name(code) for code in range(CODEBOOK)])
    return tokenizer


def write_transformers_checkpoint(folder, variant="gqa", seed=0):
    """A random transformers ChameleonForConditionalGeneration (norms perturbed so every mapping matters)."""
    tokenizer = chameleon_tokenizer()
    config = ChameleonConfig(
        vocab_size=len(tokenizer) + 3, num_hidden_layers=2, vocabulary_map=tokenizer.get_vocab(), vq_config=VQ,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **SIZES[variant],
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and "vqmodel" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def their_full_logits(model, ids):
    """transformers' Chameleon masks image columns in forward; read every column through hidden states + lm_head."""
    with torch.no_grad():
        return model.lm_head(model.model(ids).last_hidden_state)


@pytest.mark.parametrize("variant", sorted(SIZES))
def test_logits_match_transformers_over_every_vocabulary_column(tmp_path, variant):
    theirs, tokenizer = write_transformers_checkpoint(tmp_path / "theirs", variant)
    ours, processor = convert_from_transformers(tmp_path / "theirs")
    ids = torch.randint(0, theirs.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (ours(ids).logits - their_full_logits(theirs, ids)).abs().max().item()
    assert delta <= 1e-5
    assert ours.config.vocab_size == theirs.config.vocab_size
    image_ids = processor.vocabulary.code_to_id.tolist()
    assert image_ids == [tokenizer.convert_tokens_to_ids(chameleon_image_token_name(c)) for c in range(CODEBOOK)]


def test_same_pixels_give_identical_image_token_ids(tmp_path):
    theirs, _ = write_transformers_checkpoint(tmp_path / "theirs")
    _, processor = convert_from_transformers(tmp_path / "theirs")
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        their_ids = theirs.model.get_image_tokens(pixels)
        our_ids = processor.vocabulary.codes_to_ids(processor.vq_model.encode(pixels).flatten(1))
    assert torch.equal(our_ids, their_ids.long())


def test_greedy_text_continuations_are_identical(tmp_path):
    theirs, tokenizer = write_transformers_checkpoint(tmp_path / "theirs", "odd")
    ours, processor = convert_from_transformers(tmp_path / "theirs")
    prompt = torch.tensor([tokenizer("a photo of a sneaker").input_ids])
    banned = [processor.vocabulary.boi_token_id, processor.vocabulary.eoi_token_id]  # theirs masks only image ids
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, suppress_tokens=banned)
    assert torch.equal(ours.generate(prompt, **settings), theirs.generate(prompt, **settings))


def test_transformers_round_trip_is_bitwise(tmp_path):
    write_transformers_checkpoint(tmp_path / "t1", "swin")
    first, first_processor = convert_from_transformers(tmp_path / "t1", tmp_path / "ours1")
    convert_to_transformers(tmp_path / "ours1", tmp_path / "t2")
    second, second_processor = convert_from_transformers(tmp_path / "t2", tmp_path / "ours2")
    for a, b in ((first, second), (first_processor.vq_model, second_processor.vq_model)):
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    original = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "t1").state_dict()
    back = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "t2").state_dict()
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


def test_converted_checkpoint_loads_with_zero_missing_or_unexpected_keys(tmp_path):
    write_transformers_checkpoint(tmp_path / "theirs")
    convert_from_transformers(tmp_path / "theirs", tmp_path / "ours")
    from chameleon_fusion import ChameleonFusionForConditionalGeneration

    _, info = ChameleonFusionForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_a_checkpoint_with_a_missing_or_extra_tensor_fails_loudly(tmp_path):
    from safetensors.torch import load_file, save_file

    write_transformers_checkpoint(tmp_path / "theirs")
    weights = load_file(tmp_path / "theirs" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_norm.bias"},
              tmp_path / "theirs" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.self_attn.k_norm.bias'\]"):
        convert_from_transformers(tmp_path / "theirs")
    save_file({**weights, "model.layers.0.extra.weight": torch.zeros(2)}, tmp_path / "theirs" / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        convert_from_transformers(tmp_path / "theirs")


def test_converted_transformers_model_has_an_untrained_decoder_and_says_so(tmp_path):
    write_transformers_checkpoint(tmp_path / "theirs")
    _, processor = convert_from_transformers(tmp_path / "theirs", tmp_path / "ours")
    reloaded = ChameleonFusionProcessor.from_pretrained(tmp_path / "ours")
    assert reloaded.vq_model.config.decoder_trained is False
    with pytest.warns(UserWarning, match="never trained"):
        reloaded.vq_model.decode(torch.zeros(1, 4, 4, dtype=torch.long))


def test_convert_commands_run_both_ways(tmp_path, capsys):
    write_transformers_checkpoint(tmp_path / "theirs")
    assert cli_main(["convert", "--from", "transformers", str(tmp_path / "theirs"), str(tmp_path / "ours")]) == 0
    assert "UNTRAINED" in capsys.readouterr().out
    assert cli_main(["convert", "--to", "transformers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        cli_main(["convert", "--to", "transformers", str(tmp_path / "ours"), str(tmp_path / "back")])
    with pytest.raises(ValueError, match="not transformers' 'chameleon'"):
        convert_from_transformers(tmp_path / "ours")


# --- Meta's release layout ----------------------------------------------------------------------------------

META = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, norm_eps=1e-5, rope_theta=10000.0, qk_normalization=True,
            multiple_of=32, ffn_dim_multiplier=None)


def meta_tensors(params, vocab_size, shards, seed=0):
    """Random weights in Meta's names, split into model-parallel shards the way Meta's loader expects them."""
    generator = torch.Generator().manual_seed(seed)
    dim, heads, kv_heads = params["dim"], params["n_heads"], params["n_kv_heads"]
    head_dim, hidden = dim // heads, 96

    def rand(*shape, scale=0.08):
        return torch.randn(*shape, generator=generator) * scale

    full = {"tok_embeddings.weight": rand(vocab_size, dim, scale=1.0), "norm.weight": 1 + rand(dim, scale=0.2),
            "output.weight": rand(vocab_size, dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        full.update({
            p + "attention.wq.weight": rand(heads * head_dim, dim), p + "attention.wk.weight": rand(kv_heads * head_dim, dim),
            p + "attention.wv.weight": rand(kv_heads * head_dim, dim), p + "attention.wo.weight": rand(dim, heads * head_dim),
            p + "feed_forward.w1.weight": rand(hidden, dim), p + "feed_forward.w3.weight": rand(hidden, dim),
            p + "feed_forward.w2.weight": rand(dim, hidden),
            p + "attention_norm.weight": 1 + rand(dim, scale=0.2), p + "ffn_norm.weight": 1 + rand(dim, scale=0.2),
        })
        for name in "qk":  # one LayerNorm(head_dim) per shard
            for s in range(shards):
                full[f"{p}attention.{name}_normalization.weight#{s}"] = 1 + rand(head_dim, scale=0.3)
                full[f"{p}attention.{name}_normalization.bias#{s}"] = rand(head_dim, scale=0.3)
    return full


def shard(full, shards):
    """Cut the full tensors along Meta's model-parallel dimensions."""
    along = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    parts = [{} for _ in range(shards)]
    for key, tensor in full.items():
        if "#" in key:
            name, index = key.split("#")
            parts[int(index)][name] = tensor
            continue
        kind = key.split(".")[-2] if key.count(".") > 1 else key.split(".")[0]
        dimension = along.get(kind)
        for s in range(shards):
            parts[s][key] = tensor.chunk(shards, dim=dimension)[s].clone() if dimension is not None else tensor
    return parts


def reference_meta_logits(full, params, shards, ids):
    """Meta's Chameleon math, written out: interleaved (complex) RoPE, per-shard QK LayerNorm before it."""
    dim, heads, kv_heads = params["dim"], params["n_heads"], params["n_kv_heads"]
    head_dim, eps, seq = dim // heads, params["norm_eps"], ids.shape[1]
    angles = torch.outer(torch.arange(seq).float(),
                         1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    rotation = torch.polar(torch.ones_like(angles), angles)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def qk_norm(x, name, layer, count):
        per_shard = count // shards
        out = F.layer_norm(x, (head_dim,), eps=1e-5)
        weight = torch.stack([full[f"layers.{layer}.attention.{name}_normalization.weight#{h // per_shard}"] for h in range(count)])
        bias = torch.stack([full[f"layers.{layer}.attention.{name}_normalization.bias#{h // per_shard}"] for h in range(count)])
        return out * weight + bias

    def rope(x):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], head_dim // 2, 2))
        return torch.view_as_real(pairs * rotation[None, :, None, :]).flatten(-2)

    x = full["tok_embeddings.weight"][ids]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        h = rms(x, full[p + "attention_norm.weight"])
        q = qk_norm((h @ full[p + "attention.wq.weight"].T).view(1, seq, heads, head_dim), "q", i, heads)
        k = qk_norm((h @ full[p + "attention.wk.weight"].T).view(1, seq, kv_heads, head_dim), "k", i, kv_heads)
        v = (h @ full[p + "attention.wv.weight"].T).view(1, seq, kv_heads, head_dim)
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(1, seq, dim)
        x = x + attended @ full[p + "attention.wo.weight"].T
        h = rms(x, full[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ full[p + "feed_forward.w1.weight"].T) * (h @ full[p + "feed_forward.w3.weight"].T)) @ full[p + "feed_forward.w2.weight"].T
    return rms(x, full["norm.weight"]) @ full["output.weight"].T


def write_meta_release(root, shards=1, fused=False):
    """Meta's download layout: models/7b/{params.json, consolidated.NN.pth}, tokenizer/{text_tokenizer.json, vqgan.*}."""
    tokenizer = chameleon_tokenizer()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in spec["added_tokens"]:
        if token["content"] == "<image>":
            token["content"] = RESERVED_IMAGE_TOKEN  # what Meta's tokenizer calls the image placeholder
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "text_tokenizer.json").write_text(json.dumps(spec))
    vq = tiny_vq(seed=5)
    vq_state = {**vq.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(2)}
    torch.save({"state_dict": vq_state}, root / "tokenizer" / "vqgan.ckpt")
    ddconfig = dict(double_z=False, z_channels=16, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    (root / "tokenizer" / "vqgan.yaml").write_text(yaml.safe_dump(
        {"model": {"params": {"embed_dim": 16, "n_embed": CODEBOOK, "ddconfig": ddconfig, "lossconfig": {}}}}))
    params = {**META, "model_parallel_size": shards, "vocab_size": len(tokenizer)}
    full = meta_tensors(params, len(tokenizer), shards)
    model_folder = root / "models" / "7b"
    model_folder.mkdir(parents=True)
    (model_folder / "params.json").write_text(json.dumps(params))
    for index, part in enumerate(shard(full, shards)):
        if fused:
            for i in range(META["n_layers"]):
                p = f"layers.{i}."
                part[p + "attention.wqkv.weight"] = torch.cat([part.pop(p + f"attention.w{n}.weight") for n in "qkv"])
                part[p + "feed_forward.w13.weight"] = torch.cat([part.pop(p + "feed_forward.w1.weight"),
                                                                part.pop(p + "feed_forward.w3.weight")])
        torch.save(part, model_folder / f"consolidated.{index:02d}.pth")
    return full, params, vq


@pytest.mark.parametrize("shards,fused", [(1, False), (2, False), (2, True)])
def test_meta_release_converts_to_the_same_logits_as_its_own_math(tmp_path, shards, fused):
    full, params, _ = write_meta_release(tmp_path / "release", shards, fused)
    model, processor = convert_from_meta(tmp_path / "release")
    ids = torch.randint(0, params["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        delta = (model(ids).logits - reference_meta_logits(full, params, shards, ids)).abs().max().item()
    assert delta <= 1e-5
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == processor.vocabulary.image_token_id


def test_converted_meta_model_draws_an_image_with_the_meta_vq_decoder(tmp_path):
    _, _, meta_vq = write_meta_release(tmp_path / "release")
    assert cli_main(["convert", "--from", "meta", str(tmp_path / "release"), str(tmp_path / "ours")]) == 0
    from chameleon_fusion import ChameleonFusionForConditionalGeneration

    model = ChameleonFusionForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    processor = ChameleonFusionProcessor.from_pretrained(tmp_path / "ours")
    assert processor.vq_model.config.decoder_trained
    for key, tensor in meta_vq.state_dict().items():
        assert torch.equal(processor.vq_model.state_dict()[key], tensor), key
    prompt = processor(text="a photo of", return_tensors="pt")
    torch.manual_seed(0)
    ids = model.generate(**prompt, generation_mode="image")
    image = processor.post_process_multimodal_output(ids, generation_mode="image")[0]
    assert isinstance(image, Image.Image) and image.size == (16, 16)
    start = ids[0].tolist().index(processor.vocabulary.boi_token_id) + 1
    codes = processor.vocabulary.ids_to_codes(ids[0, start : start + 16]).view(1, 4, 4)
    drawn = processor.image_processor.postprocess(meta_vq.decode(codes))[0]
    assert list(drawn.getdata()) == list(image.getdata())


def test_pickled_objects_in_a_meta_checkpoint_are_refused(tmp_path):
    write_meta_release(tmp_path / "release")
    target = tmp_path / "release" / "models" / "7b" / "consolidated.00.pth"
    with open(target, "wb") as handle:
        pickle.dump({"not": object()}, handle)
    with pytest.raises(ValueError, match="not unpickled"):
        convert_from_meta(tmp_path / "release")
