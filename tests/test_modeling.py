"""The decoder: causality, caches, attention backends, checkpointing, losses, save/load, QK-Norm."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny import CODEBOOK, EOS, IMAGE_OFFSET, PAD, random_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, StaticCache

from chameleon_fusion import ChameleonFusionForConditionalGeneration
from chameleon_fusion.modeling_chameleon_fusion import ChameleonFusionHeadNorm, early_fusion_loss

VOCAB = IMAGE_OFFSET + CODEBOOK


@pytest.mark.parametrize("overrides", [{}, {"swin_norm": True}, {"qk_norm": "l2", "last_block_skip_norm": True}])
def test_changing_a_future_token_never_changes_earlier_logits(overrides):
    model = tiny_model(**overrides)
    ids = random_ids(2, 12)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def _left_padded_batch():
    ids = random_ids(2, 10, seed=3, high=PAD)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    return ids, mask


def _incremental_logits(model, ids, mask, cache, prefill: int):
    """Logits from a prefill of `prefill` tokens followed by one token per step through `cache`."""
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_incremental_decoding_matches_one_full_forward(cache_kind, padded):
    model = tiny_model()
    ids, mask = _left_padded_batch() if padded else (random_ids(2, 10, seed=3), torch.ones(2, 10, dtype=torch.long))
    cache = StaticCache(config=model.config, max_cache_len=16) if cache_kind == "static" else None
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        step = _incremental_logits(model, ids, mask, cache, prefill=4)
    real = mask.bool()
    torch.testing.assert_close(step[real], full[real], rtol=0, atol=1e-5)


def test_left_padded_row_gives_the_same_logits_as_the_row_alone():
    model = tiny_model()
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits[1, 3:]
        alone = model(ids[1:, 3:]).logits[0]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("qk_norm", ["layernorm", "rmsnorm", "l2", None])
def test_eager_and_sdpa_attention_agree(qk_norm):
    ids, mask = _left_padded_batch()
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = tiny_model(qk_norm=qk_norm)
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs.append(model(ids, attention_mask=mask).logits[mask.bool()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)


def _gradients(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    ids = random_ids(2, 12)
    plain = _gradients(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    checkpointed = _gradients(model, ids)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)


def test_save_and_load_round_trip_is_bitwise_and_uses_safetensors(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    saved = load_file(tmp_path / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, ChameleonFusionForConditionalGeneration)
    original = model.state_dict()
    assert set(saved) == set(original)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded.eval()(ids).logits)


def test_checkpoint_loads_with_trust_remote_code_where_the_package_is_not_importable(tmp_path):
    model = tiny_model(qk_norm="rmsnorm", swin_norm=True)
    model.save_pretrained(tmp_path / "ckpt")
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"} <= set(auto_map)
    ids = random_ids(1, 8)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["chameleon_fusion"] = None  # the package must not be importable here
        import torch
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
        except ValueError as error:
            assert "trust_remote_code" in str(error), error
        else:
            raise AssertionError("loaded custom code without trust_remote_code")
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "ids.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "remote.pt")!r})
        """
    )
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "remote.pt"), model(ids).logits)


def _train_losses(model, steps: int, lr: float = 3e-3) -> list[float]:
    torch.manual_seed(0)
    ids = random_ids(4, 16, seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "overrides",
    [
        {"qk_norm": "layernorm"},
        {"qk_norm": "rmsnorm"},
        {"qk_norm": "l2"},
        {"qk_norm": None},
        {"swin_norm": True},
        {"residual_dropout": 0.1, "last_block_skip_norm": True, "z_loss_coefficient": 1e-4},
    ],
)
def test_every_stability_variant_trains_with_finite_decreasing_loss(overrides):
    losses = _train_losses(tiny_model(**overrides), steps=12)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5


def _max_attention_logit(model, ids, scale: float) -> float:
    """Largest pre-softmax q.k logit of the first layer when the input embeddings are multiplied by `scale`."""
    attention = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids) * scale)
    positions = model.model.rotary_emb(hidden, torch.arange(ids.shape[1]).unsqueeze(0))
    query, key, _ = attention.project_qkv(hidden, positions)
    key = key.repeat_interleave(attention.num_key_value_groups, dim=2)
    return (torch.einsum("bqhd,bkhd->bhqk", query, key) * attention.scaling).abs().max().item()


def test_layernorm_qk_norm_keeps_attention_logits_bounded_when_inputs_grow_1000x():
    ids = random_ids(2, 12)
    with torch.no_grad():
        normed = tiny_model(qk_norm="layernorm")
        # the input RMSNorm undoes a uniform scale, so scale one layer's weights instead: q/k grow 1000x
        normed.model.layers[0].self_attn.qkv_proj.weight.mul_(1000)
        unnormed = tiny_model(qk_norm=None)
        unnormed.model.layers[0].self_attn.qkv_proj.weight.mul_(1000)
        bounded, exploded = _max_attention_logit(normed, ids, 1.0), _max_attention_logit(unnormed, ids, 1.0)
    head_dim = normed.config.head_dim
    # LayerNorm'd q, k have norm sqrt(head_dim) (unit weight), so |q.k| / sqrt(head_dim) <= sqrt(head_dim)
    assert bounded <= head_dim**0.5 + 1e-3
    assert exploded > 1000 * bounded


def test_losses_match_a_hand_computation():
    model = tiny_model(z_loss_coefficient=0.01)
    ids = torch.tensor([[1, 2, 3, IMAGE_OFFSET, IMAGE_OFFSET + 5, 4, EOS], [7, IMAGE_OFFSET + 1, 8, 9, 10, 11, 12]])
    labels = ids.clone()
    labels[1, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        logits = out.logits.float()
    text_terms, image_terms, z_terms = [], [], []
    for b in range(2):
        for t in range(ids.shape[1] - 1):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            log_probs = F.log_softmax(logits[b, t], dim=-1)
            term = -log_probs[target].item()
            (image_terms if IMAGE_OFFSET <= target < IMAGE_OFFSET + CODEBOOK else text_terms).append(term)
            z_terms.append(torch.logsumexp(logits[b, t], dim=-1).item() ** 2)
    every = text_terms + image_terms
    z_loss = sum(z_terms) / len(z_terms)
    assert len(image_terms) == 2 and len(text_terms) == 8
    assert out.text_loss.item() == pytest.approx(sum(text_terms) / len(text_terms), rel=1e-5)
    assert out.image_loss.item() == pytest.approx(sum(image_terms) / len(image_terms), rel=1e-5)
    assert out.z_loss.item() == pytest.approx(z_loss, rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(every) / len(every) + 0.01 * z_loss, rel=1e-5)


@pytest.mark.parametrize("coefficient", [0.0, 0.01])
def test_loss_gradient_equals_cross_entropy_plus_z_loss_written_out(coefficient):
    vocabulary = tiny_model().vocabulary
    logits = (torch.randn(2, 6, vocabulary.vocab_size, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, vocabulary.vocab_size, (2, 6))
    labels[0, :2] = -100
    early_fusion_loss(logits, labels, vocabulary, z_loss_coefficient=coefficient)["loss"].backward()
    ours = logits.grad.clone()
    logits.grad = None
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    valid = targets != -100
    log_z = torch.logsumexp(logits, dim=-1)[valid]
    picked = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[valid]
    ((log_z - picked).mean() + coefficient * log_z.square().mean()).backward()
    torch.testing.assert_close(ours, logits.grad)


def test_image_loss_is_none_when_no_label_is_an_image_code():
    model = tiny_model()
    ids = random_ids(1, 6, high=50)
    out = model(ids, labels=ids)
    assert out.image_loss is None and out.text_loss is not None


def test_image_logits_are_not_masked():
    model = tiny_model()
    with torch.no_grad():
        logits = model(random_ids(1, 5)).logits
    image_logits = logits[..., IMAGE_OFFSET : IMAGE_OFFSET + CODEBOOK]
    assert torch.isfinite(image_logits).all() and image_logits.abs().max() < 100


def test_bf16_forward_and_backward_are_finite():
    model = tiny_model().to(torch.bfloat16).train()
    ids = random_ids(2, 10)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_produces_new_tokens(do_sample):
    model = tiny_model()
    prompt = random_ids(2, 5, high=PAD)
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=do_sample, pad_token_id=PAD)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, :5], prompt)
    assert ((out >= 0) & (out < VOCAB)).all()


def test_greedy_generate_with_static_cache_matches_dynamic_cache():
    model = tiny_model()
    prompt = random_ids(1, 5, high=PAD)
    dynamic = model.generate(prompt, max_new_tokens=8, do_sample=False)
    static = model.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_l2_qk_norm_has_a_learnable_per_head_temperature():
    norm = ChameleonFusionHeadNorm("l2", num_heads=3, head_dim=16, eps=1e-5)
    x = torch.randn(2, 5, 3, 16) * 50
    out = norm(x)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((2, 5, 3), 4.0))
    assert norm.temperature.requires_grad and norm.temperature.shape == (3, 1)


def test_out_of_vocabulary_ids_raise_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.tensor([[1.0, 2.0]]))


def test_config_rejects_bad_layouts():
    with pytest.raises(ValueError, match="qk_norm"):
        tiny_config(qk_norm="batchnorm")
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="image_token_ids"):
        tiny_config(image_token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_config(vocab_size=110)
