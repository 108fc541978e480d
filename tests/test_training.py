"""Training: documents -> datasets, the collator, Trainer with per-modality logging, PEFT recipes, resume, DDP, CLI."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import tiny_config, tiny_processor
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from chameleon_fusion import ChameleonFusionForConditionalGeneration, modeling_chameleon_fusion
from chameleon_fusion.cli import main as cli_main
from chameleon_fusion.modeling_chameleon_fusion import apply_rotary
from chameleon_fusion.training import callbacks
from chameleon_fusion.training.callbacks import EarlyFusionLoggingCallback
from chameleon_fusion.training.collator import EarlyFusionCollator
from chameleon_fusion.training.documents import modality_ramp, pack_sequences, read_jsonl, tokenize_documents
from chameleon_fusion.training.peft_recipes import add_image_rows, add_lora, image_token_ids, train_image_rows
from chameleon_fusion.training.train import load_model

DOCUMENTS = [
    {"segments": [{"text": "a photo of a sneaker"}]},
    {"segments": [{"text": "here is a bag"}, {"image": "images/0.png"}, {"text": "and next to it an ankle boot"}]},
    {"prompt": [{"text": "a red circle"}], "answer": [{"image": "images/1.png"}]},
    {"segments": [{"image": "images/2.png"}, {"text": "the quick brown fox"}, {"image": "images/3.png"}]},
    {"segments": [{"text": "the quick brown fox jumps over the lazy dog"}]},
    {"prompt": [{"text": "a bag"}, {"image": "images/3.png"}], "answer": [{"text": "an ankle boot"}]},
]


def write_corpus(folder, documents=DOCUMENTS, images=4):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(images):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in documents), encoding="utf-8")
    return path



@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenized(corpus, processor, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return tokenize_documents(read_jsonl(corpus, cache_dir=str(cache)), processor)


def new_model(processor, seed=0, **overrides):
    torch.manual_seed(seed)
    return ChameleonFusionForConditionalGeneration(tiny_config(**processor.vocabulary.layout(), **overrides))


def arguments(folder, **overrides):
    fields = dict(
        output_dir=str(folder), per_device_train_batch_size=4, learning_rate=3e-3, max_steps=4, logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False, disable_tqdm=True, seed=0,
        dataloader_pin_memory=False,
    )
    return TrainingArguments(**(fields | overrides))


# --- documents -> datasets ----------------------------------------------------------------------------------


def test_documents_become_bos_document_eos_with_prompt_lengths(tokenized, processor, corpus):
    folder = corpus.parent
    image = Image.open(folder / "images" / "0.png")
    expected = processor(documents=[["here is a bag", image, "and next to it an ankle boot"]], add_eos=True)
    assert tokenized[1]["input_ids"] == expected["input_ids"][0]
    assert tokenized[1]["prompt_length"] == 0
    prompt = processor(documents=[["a red circle"]])["input_ids"][0]
    answer = processor.encode_images([Image.open(folder / "images" / "1.png")])[0]
    assert tokenized[2]["input_ids"] == prompt + answer + [processor.vocabulary.eos_token_ids[0]]
    assert tokenized[2]["prompt_length"] == len(prompt)


def test_a_missing_image_names_the_file_and_the_line(tmp_path):
    documents = DOCUMENTS[:2] + [{"segments": [{"text": "x"}, {"image": "images/missing.png"}]}]
    path = write_corpus(tmp_path, documents)
    with pytest.raises(FileNotFoundError, match=r"docs\.jsonl:3: image file not found: .*missing\.png"):
        read_jsonl(path, cache_dir=str(tmp_path / "cache"))
    path.write_text(json.dumps(DOCUMENTS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"segments": [{"video": "a.mp4"}]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.jsonl:1: each segment"):
        read_jsonl(path)


def test_tokenizing_again_reuses_the_cache_and_an_edited_image_invalidates_it(tmp_path, processor):
    path = write_corpus(tmp_path)
    first = tokenize_documents(read_jsonl(path, cache_dir=str(tmp_path / "cache")), processor)
    again = tokenize_documents(read_jsonl(path, cache_dir=str(tmp_path / "cache")), processor)
    assert again._fingerprint == first._fingerprint and again.cache_files == first.cache_files
    Image.new("RGB", (16, 16), "red").save(tmp_path / "images" / "0.png")
    os.utime(tmp_path / "images" / "0.png", ns=(1, 1))
    edited = tokenize_documents(read_jsonl(path, cache_dir=str(tmp_path / "cache")), processor)
    assert edited._fingerprint != first._fingerprint
    assert edited[1]["input_ids"] != first[1]["input_ids"]


def test_packing_fills_rows_and_never_splits_an_image():
    boi, eoi, image = 1, 2, [1] + [7] * 5 + [2]
    rng = np.random.default_rng(0)
    sequences = [[int(t) for t in rng.integers(10, 20, rng.integers(1, 9))] + image * int(rng.integers(0, 3))
                 for _ in range(40)]
    rows = pack_sequences(sequences, 12, boi, eoi)
    assert sum(rows, []) == sum(sequences, [])
    for row in rows:
        assert len(row) <= 12
        starts = [i for i, t in enumerate(row) if t == boi]
        assert all(row[s : s + 7] == image for s in starts) and row.count(eoi) == len(starts)
    for row, following in zip(rows, rows[1:]):  # a row is short only when the next image would not fit
        assert len(row) == 12 or (following[:7] == image and len(row) + 7 > 12)
    with pytest.raises(ValueError, match="longer than max_length"):
        pack_sequences([image * 2], 6, boi, eoi)


def test_tokenize_with_packing_and_its_argument_errors(corpus, processor, tmp_path):
    documents = read_jsonl(corpus, cache_dir=str(tmp_path)).select([0, 1, 3, 4])
    packed = tokenize_documents(documents, processor, max_length=40, pack=True)
    assert max(len(ids) for ids in packed["input_ids"]) <= 40
    assert sum(packed["input_ids"], []) == sum(tokenize_documents(documents, processor)["input_ids"], [])
    with pytest.raises(ValueError, match="max_length"):
        tokenize_documents(documents, processor, max_length=10)
    with pytest.raises(ValueError, match="pack=True needs max_length"):
        tokenize_documents(documents, processor, pack=True)
    with pytest.raises(ValueError, match="prompt"):
        tokenize_documents(read_jsonl(corpus, cache_dir=str(tmp_path)), processor, max_length=40, pack=True)
    with pytest.raises(TypeError, match="documents"):
        tokenize_documents([{"segments": []}], processor)


def test_modality_ramp_moves_from_text_to_interleaved(tokenized, processor):
    ramp = modality_ramp(tokenized, processor.vocabulary, {"text": 1.0}, {"interleaved": 1.0}, num_rows=200)
    has_image = [processor.vocabulary.boi_token_id in ids for ids in ramp["input_ids"]]
    assert len(has_image) == 200
    assert not has_image[0] and has_image[-1]
    assert sum(has_image[:50]) < 15 and sum(has_image[-50:]) > 35
    with pytest.raises(ValueError, match="start"):
        modality_ramp(tokenized, processor.vocabulary, {"audio": 1.0}, {"text": 1.0}, num_rows=10)


# --- the collator -------------------------------------------------------------------------------------------


def test_collator_pads_and_masks_by_what_is_trained(tokenized, processor):
    vocabulary = processor.vocabulary
    rows = [tokenized[1], tokenized[2]]  # an interleaved document, a prompt/answer pair
    batch = EarlyFusionCollator(vocabulary)(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (2, max(len(r["input_ids"]) for r in rows))
    assert torch.equal(labels, ids.masked_fill(mask == 0, -100)) and (mask[1] == 0).any()
    is_image = vocabulary.is_image_token(ids)
    image_only = EarlyFusionCollator(vocabulary, train_on="image")(rows)["labels"]
    assert torch.equal(image_only != -100, is_image)
    text_only = EarlyFusionCollator(vocabulary, train_on="text")(rows)["labels"]
    assert torch.equal(text_only != -100, ~is_image & mask.bool())
    answer = EarlyFusionCollator(vocabulary, train_on="answer")(rows)["labels"]
    prompt_length = rows[1]["prompt_length"]
    assert (answer[1, :prompt_length] == -100).all() and torch.equal(answer[0], labels[0])
    assert torch.equal(answer[1, prompt_length : len(rows[1]["input_ids"])], ids[1, prompt_length : len(rows[1]["input_ids"])])


def test_prompt_dropout_replaces_the_prompt_by_the_unconditional_one(tokenized, processor):
    vocabulary = processor.vocabulary
    row = tokenized[2]
    dropped = EarlyFusionCollator(vocabulary, prompt_dropout=1.0)([row])["input_ids"][0].tolist()
    assert dropped == [vocabulary.bos_token_id] + row["input_ids"][row["prompt_length"] :]
    assert dropped[1] == vocabulary.boi_token_id
    kept = EarlyFusionCollator(vocabulary, prompt_dropout=0.0)([row])["input_ids"][0].tolist()
    assert kept == row["input_ids"]
    torch.manual_seed(0)
    share = EarlyFusionCollator(vocabulary, prompt_dropout=0.3)
    dropped_count = sum(len(share([row])["input_ids"][0]) < len(row["input_ids"]) for _ in range(400))
    assert 80 < dropped_count < 160


def test_collator_pads_to_a_multiple_of_the_given_length(tokenized, processor):
    rows = [tokenized[1], tokenized[2]]
    longest = max(len(r["input_ids"]) for r in rows)
    batch = EarlyFusionCollator(processor.vocabulary, pad_to_multiple_of=16)(rows)
    assert batch["input_ids"].shape[1] == -(-longest // 16) * 16 > longest
    assert batch["attention_mask"][:, longest:].sum() == 0 and (batch["labels"][:, longest:] == -100).all()


def test_collator_argument_errors(tokenized, processor):
    with pytest.raises(ValueError, match="train_on"):
        EarlyFusionCollator(processor.vocabulary, train_on="images")
    with pytest.raises(ValueError, match="prompt_dropout"):
        EarlyFusionCollator(processor.vocabulary, prompt_dropout=1.5)
    with pytest.raises(TypeError, match="vocabulary"):
        EarlyFusionCollator(processor)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        EarlyFusionCollator(processor.vocabulary, train_on="answer")([{"input_ids": [1, 2, 3]}])


# --- Trainer and the logging callback -----------------------------------------------------------------------


def test_loss_falls_through_plain_trainer(tokenized, processor, tmp_path):
    trainer = Trainer(
        model=new_model(processor),
        args=arguments(tmp_path, max_steps=40, logging_steps=10, learning_rate=1e-2),
        train_dataset=tokenized,
        data_collator=EarlyFusionCollator(processor.vocabulary),
    )
    EarlyFusionLoggingCallback(attention_logits=False).attach(trainer).train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    assert logs[-1]["text_loss"] < 0.7 * logs[0]["text_loss"] and logs[-1]["image_loss"] < 0.7 * logs[0]["image_loss"]


def manual_attention_logit_max(model, batch) -> list[float]:
    """Every layer's largest pre-softmax logit, from the layer inputs, over causal non-padding pairs."""
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: inputs.append(a[:2])) for layer in model.model.layers]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    valid = batch["attention_mask"].bool()
    seq = valid.shape[1]
    allowed = torch.ones(seq, seq).tril().bool() & valid[:, None, :] & valid[:, :, None]  # (batch, query, key)
    maxima = []
    for layer, (hidden, (cos, sin)) in zip(model.model.layers, inputs):
        attention = layer.self_attn
        qkv = F.linear(layer.input_layernorm(hidden), attention.qkv_proj.weight)
        heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        q, k, _ = qkv.unflatten(-1, (-1, dim)).split((heads, kv_heads, kv_heads), dim=2)
        q, k = apply_rotary(attention.q_norm(q), cos, sin), apply_rotary(attention.k_norm(k), cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * dim**-0.5
        maxima.append(logits.masked_fill(~allowed[:, None], -math.inf).max().item())
    return maxima


def test_logged_values_match_a_manual_computation_and_reach_tensorboard(tokenized, processor, tmp_path, monkeypatch):
    monkeypatch.setattr(callbacks, "LOGIT_BLOCK_ELEMENTS", 1000)  # several query blocks per layer
    model = new_model(processor, z_loss_coefficient=1e-4)
    collator = EarlyFusionCollator(processor.vocabulary)
    batch = collator([tokenized[i] for i in range(len(tokenized))])
    with torch.no_grad():
        expected = model(**batch)
    expected_attention = manual_attention_logit_max(model, batch)
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=1, per_device_train_batch_size=len(tokenized), report_to=["tensorboard"]),
        train_dataset=tokenized,
        data_collator=collator,
    )
    EarlyFusionLoggingCallback().attach(trainer).train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    assert logged["text_loss"] == pytest.approx(expected.text_loss.item(), rel=1e-5)
    assert logged["image_loss"] == pytest.approx(expected.image_loss.item(), rel=1e-5)
    assert logged["z_loss"] == pytest.approx(expected.z_loss.item(), rel=1e-5)
    targets = batch["labels"][:, 1:]
    share = (processor.vocabulary.is_image_token(targets) & (targets != -100)).sum() / (targets != -100).sum()
    assert logged["image_token_share"] == pytest.approx(share.item(), rel=1e-6)
    for layer, value in enumerate(expected_attention):
        assert logged[f"attention_logit_max/layer_{layer}"] == pytest.approx(value, rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(tmp_path.glob("runs/*"))
    scalars = EventAccumulator(str(events)).Reload()
    assert scalars.Scalars("train/text_loss")[0].value == pytest.approx(logged["text_loss"], rel=1e-6)
    assert "train/attention_logit_max/layer_1" in scalars.Tags()["scalars"]


def test_the_callback_refuses_a_model_without_a_vocabulary(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(TypeError, match="ChameleonFusion model"):
        EarlyFusionLoggingCallback().on_train_begin(arguments(tmp_path), None, None, model=model)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tokenized, processor, tmp_path):
    def run(folder, stop_at=None, resume=None):
        trainer = Trainer(
            model=new_model(processor, seed=1),
            args=arguments(folder, max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=2),
            train_dataset=tokenized,
            data_collator=EarlyFusionCollator(processor.vocabulary, prompt_dropout=0.5),
            callbacks=[StopAt(stop_at)] if stop_at else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    interrupted = run(tmp_path / "interrupted", stop_at=3)
    assert interrupted.state.global_step == 3
    resumed = run(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-3"))
    final = [entry["loss"] for entry in straight.state.log_history if entry.get("step") == 6 and "loss" in entry]
    again = [entry["loss"] for entry in resumed.state.log_history if entry.get("step") == 6 and "loss" in entry]
    assert abs(final[0] - again[0]) <= 1e-6
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


# --- bf16 ---------------------------------------------------------------------------------------------------


def test_bf16_training_on_cpu_keeps_the_loss_finite_and_non_zero(tokenized, processor, tmp_path):
    collator = EarlyFusionCollator(processor.vocabulary)
    batch = collator([tokenized[i] for i in range(4)])
    with torch.no_grad():
        float32_loss = new_model(processor)(**batch).loss.item()
    model = new_model(processor).to(torch.bfloat16)
    trainer = Trainer(model=model, args=arguments(tmp_path, bf16=True, use_cpu=True, max_steps=3), train_dataset=tokenized, data_collator=collator)
    EarlyFusionLoggingCallback().attach(trainer).train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        for key in ("loss", "text_loss", "image_loss"):
            assert math.isfinite(entry[key]) and entry[key] > 0.1, (key, entry)
    with torch.no_grad():
        bf16_loss = new_model(processor).to(torch.bfloat16)(**batch).loss.item()
    assert bf16_loss == pytest.approx(float32_loss, rel=0.02)


# --- PEFT ---------------------------------------------------------------------------------------------------


def train_a_few_steps(model, batch, steps=5, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_lora_trains_saves_reloads_and_merges_to_the_same_logits(tokenized, processor, tmp_path):
    from peft import PeftModel

    batch = EarlyFusionCollator(processor.vocabulary)([tokenized[i] for i in range(4)])
    lora = add_lora(new_model(processor), r=4, lora_alpha=8)
    targets = {name.rsplit(".", 1)[0] for name, p in lora.named_parameters() if p.requires_grad}
    wrapped = sorted({t.split(".lora_")[0].removeprefix("base_model.model.") for t in targets})
    assert wrapped == [f"model.layers.{i}.{m}" for i in range(2) for m in
                       ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj")]
    with torch.no_grad():
        before = lora(**batch).logits
    train_a_few_steps(lora, batch)
    with torch.no_grad():
        trained = lora(**batch).logits
    assert not torch.allclose(before, trained, atol=1e-3)
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(new_model(processor), tmp_path / "adapter").eval()
    merged = PeftModel.from_pretrained(new_model(processor), tmp_path / "adapter").merge_and_unload().eval()
    assert isinstance(merged, ChameleonFusionForConditionalGeneration)
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, trained, atol=1e-6)
        assert torch.allclose(merged(**batch).logits, trained, atol=1e-5)


def test_image_rows_recipe_changes_only_the_image_rows(tokenized, processor, tmp_path):
    from peft import PeftModel

    batch = EarlyFusionCollator(processor.vocabulary)([tokenized[i] for i in range(4)])
    original = new_model(processor).state_dict()
    rows = image_token_ids(processor.vocabulary)
    assert len(rows) == processor.vocabulary.codebook_size + 2
    peft_model = train_image_rows(new_model(processor))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 2 * len(rows) * 64
    train_a_few_steps(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "rows")
    merged = PeftModel.from_pretrained(new_model(processor), tmp_path / "rows").merge_and_unload().state_dict()
    others = torch.ones(processor.vocabulary.vocab_size, dtype=torch.bool)
    others[rows] = False
    for name, weight in merged.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(weight[others], original[name][others]), name
            assert (weight[rows] != original[name][rows]).any(dim=1).all(), name
        else:
            assert torch.equal(weight, original[name]), name


def test_a_text_only_lm_grows_image_rows_initialised_near_the_mean(tokenized, processor):
    torch.manual_seed(0)
    text_only = processor.vocabulary.text_vocab_size + 6  # text ids and the special ids, no image codes
    model = LlamaForCausalLM(LlamaConfig(vocab_size=text_only, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    old_input, old_output = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
    add_image_rows(model, processor.vocabulary.layout(), noise_scale=0.1)
    for old, new in ((old_input, model.get_input_embeddings().weight), (old_output, model.lm_head.weight)):
        assert new.shape[0] == processor.vocabulary.vocab_size
        assert torch.equal(new[:text_only], old)
        offset = (new[text_only:] - old.mean(0)) / old.std(0)
        assert offset.abs().max() < 0.6 and offset.std() > 0.05
    batch = EarlyFusionCollator(processor.vocabulary)([tokenized[i] for i in range(4)])
    with torch.no_grad():
        before = model(**batch).loss.item()
    train_a_few_steps(model, batch, steps=10, lr=3e-3)
    with torch.no_grad():
        assert model(**batch).loss.item() < before
    with pytest.raises(ValueError, match="smaller"):
        add_image_rows(model, {"vocab_size": 10})


# --- the command --------------------------------------------------------------------------------------------


def test_accelerate_configs_load_and_name_real_things():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    root = Path(__file__).resolve().parents[1]
    configs = {path.stem: load_config_from_file(str(path)) for path in (root / "examples" / "accelerate").glob("*.yaml")}
    assert {name: c.distributed_type for name, c in configs.items()} == {
        "ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP, "deepspeed_zero3": DistributedType.DEEPSPEED}
    layer_class = configs["fsdp"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert hasattr(modeling_chameleon_fusion, layer_class)
    zero3 = json.loads((root / configs["deepspeed_zero3"].deepspeed_config["deepspeed_config_file"]).read_text())
    assert zero3["zero_optimization"]["stage"] == 3


@pytest.fixture(scope="module")
def saved_model(processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    new_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_train_command_from_a_config_file_with_lora_merged(corpus, saved_model, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tmp_path / "train.yaml"
    config.write_text(
        f"data: {corpus}\nmodel: {saved_model}\nmax_steps: 2\nbatch_size: 2\nlogging_steps: 1\n"
        f"lora: true\nmerge_adapter: true\ncache_dir: {tmp_path / 'cache'}\neval_data: {corpus}\neval_steps: 2\n"
        "modality_start: text=1\nmodality_end: interleaved=1\n"
        "training_args:\n  save_strategy: 'no'\n  disable_tqdm: true\n",
        encoding="utf-8",
    )
    assert cli_main(["train", "--config", str(config), "--output-dir", str(tmp_path / "out"), "--lr", "1e-2"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(saved_model)
    assert isinstance(merged, ChameleonFusionForConditionalGeneration)
    assert not torch.equal(merged.model.layers[0].self_attn.qkv_proj.weight, original.model.layers[0].self_attn.qkv_proj.weight)
    assert torch.equal(merged.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert (tmp_path / "out" / "image_tokenizer").is_dir()
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert "text_loss" in train_logs[0] and train_logs[1]["learning_rate"] > 0
    assert train_logs[1]["image_token_share"] > 0  # the ramp ends on interleaved rows
    assert any("eval_loss" in entry for entry in state["log_history"])


def test_train_command_names_bad_options(corpus, saved_model, tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"data": str(corpus), "model": str(saved_model), "learning_rate": 1e-3}))
    with pytest.raises(ValueError, match="'learning_rate'"):
        cli_main(["train", "--config", str(config), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--output-dir"):
        cli_main(["train", "--data", str(corpus), "--model", str(saved_model)])
    with pytest.raises(ValueError, match="--max-steps"):
        cli_main(["train", "--data", str(corpus), "--model", str(saved_model), "--output-dir", str(tmp_path / "o"),
                  "--modality-start", "text=1", "--modality-end", "interleaved=1"])
    with pytest.raises(ValueError, match="--image-embeddings"):
        cli_main(["train", "--data", str(corpus), "--model", str(saved_model), "--output-dir", str(tmp_path / "o"),
                  "--image-embeddings", "codebook"])


def test_codebook_image_embeddings_start_alike_where_the_codes_are_alike(tmp_path):
    processor = tiny_processor()
    codebook = processor.vq_model.quantize.embedding.weight  # two clusters of codes: 0-15 and 16-31
    generator = torch.Generator().manual_seed(0)
    centre = torch.randn(codebook.shape[1], generator=generator)
    with torch.no_grad():
        codebook.copy_(0.1 * torch.randn(codebook.shape, generator=generator))
        codebook[:16] += centre
        codebook[16:] -= centre
    (tmp_path / "decoder.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                                                       "num_attention_heads": 4, "tie_word_embeddings": True}))
    models = {}
    for start in ("random", "codebook"):
        torch.manual_seed(0)
        options = argparse.Namespace(model_config=str(tmp_path / "decoder.json"), image_embeddings=start)
        models[start] = load_model(options, processor).get_input_embeddings().weight.detach()
    ids = processor.vocabulary.code_to_id
    rows = F.normalize(models["codebook"][ids], dim=-1)
    similarity = rows @ rows.T
    assert similarity[:16, :16].mean() > 0.8 and similarity[16:, 16:].mean() > 0.8 and similarity[:16, 16:].mean() < -0.8
    assert abs(models["codebook"][ids].std().item() - 0.02) < 1e-3  # the init scale of the other rows
    others = torch.ones(len(models["random"]), dtype=torch.bool)
    others[ids] = False
    assert torch.equal(models["codebook"][others], models["random"][others])
    random_rows = F.normalize(models["random"][ids], dim=-1)
    assert (random_rows @ random_rows.T)[:16, 16:].mean().abs() < 0.1
    processor.vq_model = None
    with pytest.raises(ValueError, match="vq_model"):
        load_model(options, processor)


def test_two_processes_under_accelerate_launch_match_one_process_at_the_same_global_batch(saved_model, tmp_path):
    corpus = write_corpus(tmp_path, DOCUMENTS + DOCUMENTS[:2])  # 8 rows: whole global batches of 4
    config = tmp_path / "sgd.json"  # plain SGD: Adam would blow float rounding up into visible weight differences
    config.write_text(json.dumps({"training_args": {"optim": "sgd"}}))
    common = ["train", "--config", str(config), "--data", str(corpus), "--model", str(saved_model), "--max-steps", "3",
              "--logging-steps", "1", "--lr", "0.5", "--cache-dir", str(tmp_path / "cache")]
    assert cli_main([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]) == 0
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "chameleon_fusion", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=os.environ | {"TRANSFORMERS_VERBOSITY": "info", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Instantaneous batch size per device = 2" in result.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in result.stderr  # 2 processes
    one, two = (json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"] for run in ("one", "two"))
    assert len(one) == len(two) == 4
    for a, b in zip(one[:3], two[:3]):
        assert a["epoch"] == b["epoch"]
        for key in ("loss", "text_loss", "image_loss", "z_loss", "attention_logit_max/layer_0", "attention_logit_max/layer_1"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    from safetensors.torch import load_file

    weights_one, weights_two = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert one[2]["loss"] < one[0]["loss"] - 0.1  # the steps did train
    for name, value in weights_one.items():
        assert torch.allclose(value, weights_two[name], atol=1e-5), name
