"""Publishing to the Hub: the real huggingface_hub client against a stand-in of the Hub on 127.0.0.1.

Loading runs in fresh processes with HF_ENDPOINT pointed at the stand-in (huggingface_hub reads it at import).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import TOKEN, StandInHub
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from PIL import Image
from tiny import tiny_config, tiny_processor

from chameleon_fusion import ChameleonFusionForConditionalGeneration
from chameleon_fusion.publish import PACKAGE_DIR, check_training_publication, prepare_hub_folder, publish

PROMPT = "a photo of <image> and"
LOGIT_IDS = [[300, 5, 17, 304, 306, 307, 33, 40]]
TRAINING_CONFIG = {"data": "org/documents", "lr": 1e-4, "lora_r": 4, "hub_token": TOKEN}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def start_python(script: str, env: dict, cwd: Path) -> subprocess.Popen:
    """A fresh interpreter running `script`."""
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def finish(process: subprocess.Popen, stdin: str = "") -> tuple[str, str]:
    """Its (stdout, stderr) once it ends."""
    return process.communicate(stdin, timeout=300)


def succeeded(process: subprocess.Popen, output: tuple[str, str]) -> tuple[str, str]:
    assert process.returncode == 0, output[1][-4000:]
    return output


def last_json_line(output: tuple[str, str]):
    return json.loads(output[0].strip().splitlines()[-1])


def hub_env(hub: StandInHub, home: Path) -> dict:
    """Environment of a process talking to the stand-in: its own empty HF_HOME, no token."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf"),
            "HF_MODULES_CACHE": str(home / "modules"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def noise_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8))


# --- what gets published, and what it does before publishing ------------------------------------------------



@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny model with its processor and a LoRA adapter, saved; with the outputs they give here."""
    root = tmp_path_factory.mktemp("original")
    processor = tiny_processor()
    torch.manual_seed(0)
    model = ChameleonFusionForConditionalGeneration(tiny_config(**processor.vocabulary.layout())).eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    noise_image().save(root / "image.png")
    inputs = processor(text=PROMPT, images=[Image.open(root / "image.png")], return_tensors="pt")
    with torch.inference_mode():
        text_ids = model.generate(**inputs, generation_mode="text", max_new_tokens=8)
        image_ids = model.generate(**inputs, generation_mode="image", image_temperature=0)
    base = ChameleonFusionForConditionalGeneration.from_pretrained(root / "model")
    lora = LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    adapted = get_peft_model(base, lora).eval()
    adapted.save_pretrained(root / "adapter")
    with torch.inference_mode():
        adapter_logits = adapted(torch.tensor(LOGIT_IDS)).logits
        base_logits = model(torch.tensor(LOGIT_IDS)).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter changes something
    return {"root": root, "prompt_ids": inputs["input_ids"].tolist(), "text_ids": text_ids.tolist(),
            "image_ids": image_ids.tolist(), "adapter_logits": adapter_logits, "base_logits": base_logits}


# On a machine with the library installed: the command (dry run; refused without a token; published with the
# token file `hf auth login` writes), then Trainer with push_to_hub=True, then Trainer's output folder published
# the way `train --publish-repo-id` does. Prints the trained model's logits.
LOCAL_SCRIPT = """
import argparse, json, os, torch
from transformers import Trainer, TrainingArguments, default_data_collator
from chameleon_fusion import ChameleonFusionForConditionalGeneration, ChameleonFusionProcessor
from chameleon_fusion.cli import main
from chameleon_fusion.publish import publish_training_output

main(["publish", {model!r}, "--repo-id", "org/from-cli", "--dry-run"])
try:
    main(["publish", {model!r}, "--repo-id", "org/from-cli"])
except ValueError as error:
    print("refused:", error)
os.makedirs(os.environ["HF_HOME"], exist_ok=True)
with open(os.path.join(os.environ["HF_HOME"], "token"), "w") as handle:  # where `hf auth login` keeps it
    handle.write({token!r})
main(["publish", {model!r}, "--repo-id", "org/from-cli", "--private"])

model = ChameleonFusionForConditionalGeneration.from_pretrained({model!r})
processor = ChameleonFusionProcessor.from_pretrained({model!r})
rows = [{{"input_ids": ids, "labels": ids}} for ids in ([300, 5, 6, 7, 301], [300, 9, 8, 7, 301])] * 2
args = TrainingArguments(output_dir={out!r}, push_to_hub=True, hub_model_id="org/trained", hub_token={token!r},
                         max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to="none",
                         save_strategy="no", use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                  data_collator=default_data_collator)
trainer.train()
trainer.push_to_hub()
trainer.save_state()
options = argparse.Namespace(output_dir={out!r}, publish_repo_id="org/trained-card", model={model!r},
                             max_steps=2, lora=False, run=main)  # what `train --publish-repo-id` hands over
publish_training_output(options)
with torch.inference_mode():
    print(json.dumps(model.eval()(torch.tensor({ids!r})).logits.tolist()))
"""


# Where chameleon_fusion cannot be imported: everything from the stand-in with trust_remote_code, and the usage
# snippets of the published cards (those without a chameleon_fusion import). Waits for a line on stdin first.
REMOTE_SCRIPT = """
import json, re, sys
sys.modules["chameleon_fusion"] = None
import torch
from huggingface_hub import hf_hub_download
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

sys.stdin.readline()
out = {{}}
model = AutoModelForCausalLM.from_pretrained("org/tiny", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("org/tiny", trust_remote_code=True)
out["classes"] = [type(model).__module__, type(processor).__module__]
inputs = processor(text={prompt!r}, images=[Image.open({image!r})], return_tensors="pt")
out["prompt_ids"] = inputs["input_ids"].tolist()
with torch.inference_mode():
    out["text_ids"] = model.generate(**inputs, generation_mode="text", max_new_tokens=8).tolist()
    out["image_ids"] = model.generate(**inputs, generation_mode="image", image_temperature=0).tolist()
    base = AutoModelForCausalLM.from_pretrained("org/tiny", trust_remote_code=True)
    adapted = PeftModel.from_pretrained(base, "org/tiny-lora").eval()
    out["adapter_logits"] = adapted(torch.tensor({ids!r})).logits.tolist()
    trained = AutoModelForCausalLM.from_pretrained("org/trained", trust_remote_code=True).eval()
    out["trained_logits"] = trained(torch.tensor({ids!r})).logits.tolist()
for repo in ("org/tiny", "org/tiny-lora"):
    card = open(hf_hub_download(repo, "README.md"), encoding="utf-8").read()
    names = {{}}
    for block in re.findall(r"```python\\n(.*?)```", card, re.S):
        if "chameleon_fusion" not in block:
            exec(block, names)
    out[repo] = [names["story"], list(names["picture"].size), [type(p).__name__ for p in names["page"]],
                 names["caption"]]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def published(original, tmp_path_factory):
    """The stand-in Hub after every way of publishing, and what the local and the remote process saw.

    The two processes start together (their imports take the longest); the remote one reads the Hub only
    after the local one has finished.
    """
    root, home = original["root"], tmp_path_factory.mktemp("processes")
    hub = StandInHub().start()
    remote = start_python(REMOTE_SCRIPT.format(prompt=PROMPT, image=str(root / "image.png"), ids=LOGIT_IDS),
                          hub_env(hub, home / "remote"), home)
    local = start_python(LOCAL_SCRIPT.format(model=str(root / "model"), out=str(home / "out"), token=TOKEN,
                                             ids=LOGIT_IDS), hub_env(hub, home / "local"), home)
    try:
        publish(root / "model", "org/tiny", token=TOKEN, endpoint=hub.url, training_config=TRAINING_CONFIG,
                evaluation={"eval_loss": 2.5, "eval_runtime": 0.1})
        publish(root / "adapter", "org/tiny-lora", token=TOKEN, endpoint=hub.url, base_model="org/tiny",
                training_config=TRAINING_CONFIG)
        local_output = succeeded(local, finish(local))
    except BaseException:
        for process in (local, remote):
            process.kill()
        hub.stop()
        raise
    requests_before_remote = list(hub.requests)
    remote_output = finish(remote, "go\n")
    yield {"hub": hub, "local_output": local_output, "requests_before_remote": requests_before_remote,
           "trained_logits": torch.tensor(last_json_line(local_output)), "remote": (remote, remote_output)}
    hub.stop()


@pytest.fixture(scope="module")
def remote(published):
    """What the remote process printed (a failure there fails only the tests that read it)."""
    return last_json_line(succeeded(*published["remote"]))


# --- loading what was published -----------------------------------------------------------------------------


def test_published_model_and_processor_load_with_remote_code_and_generate_the_same_ids(original, published, remote):
    assert published["hub"].unrouted == []  # the clients asked for nothing the stand-in lacks
    assert all(module.startswith("transformers_modules") for module in remote["classes"]), remote["classes"]
    assert remote["prompt_ids"] == original["prompt_ids"]
    assert remote["text_ids"] == original["text_ids"]
    assert remote["image_ids"] == original["image_ids"]


def test_published_adapter_loads_on_the_base_model_and_gives_the_same_logits(original, remote):
    assert torch.allclose(torch.tensor(remote["adapter_logits"]), original["adapter_logits"], atol=1e-5)


def test_trainer_push_to_hub_publishes_a_model_that_loads_with_the_trained_weights(original, published, remote):
    files = published["hub"].files("org/trained")
    assert {"model.safetensors", "config.json", "modeling_chameleon_fusion.py", "processor_config.json",
            "image_tokenizer/model.safetensors"} <= set(files)
    assert not torch.allclose(published["trained_logits"], original["base_logits"], atol=1e-3)  # it trained
    assert torch.allclose(torch.tensor(remote["trained_logits"]), published["trained_logits"], atol=1e-5)


def test_publishing_a_trainer_output_folder_leaves_training_state_out_and_describes_the_run(published):
    files = published["hub"].files("org/trained-card")
    assert "model.safetensors" in files and "image_tokenizer/config.json" in files
    assert not any(name.endswith((".bin", ".pt")) or name.startswith("checkpoint") for name in files)
    card = ModelCard(files["README.md"].decode())
    assert "Trained for 2 steps" in card.text and "| max_steps | 2 |" in card.text and "function" not in card.text


def test_train_publish_options_are_checked_before_training(monkeypatch, original):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = argparse.Namespace(publish_repo_id="org/run", model="org/base", lora=True, merge_adapter=False)
    check_training_publication(run)
    with pytest.raises(ValueError, match="invalid repo id"):
        check_training_publication(argparse.Namespace(**{**vars(run), "publish_repo_id": "org/a b"}))
    with pytest.raises(ValueError, match="needs --model to be the base model's Hub id"):
        check_training_publication(argparse.Namespace(**{**vars(run), "model": str(original["root"] / "model")}))
    check_training_publication(argparse.Namespace(**{**vars(run), "model": "./local", "merge_adapter": True}))


# --- the card ----------------------------------------------------------------------------------------------


def test_card_metadata_parses_and_holds_the_hub_fields(published):
    model_card = ModelCard(published["hub"].files("org/tiny")["README.md"].decode())
    data = model_card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "any-to-any", "apache-2.0")
    assert {"chameleon-fusion", "custom_code"} <= set(data.tags) and data.datasets == ["org/documents"]
    [result] = data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("loss", 2.5, "org/documents")
    assert "| 306 – 337 | image codes" in model_card.text and TOKEN not in model_card.content
    adapter_card = ModelCard(published["hub"].files("org/tiny-lora")["README.md"].decode())
    assert (adapter_card.data.library_name, adapter_card.data.base_model) == ("peft", "org/tiny")
    assert "lora" in adapter_card.data.tags


def test_card_snippets_run_against_the_hub_in_a_process_without_the_package(remote):
    for repo in ("org/tiny", "org/tiny-lora"):
        story, picture_size, page, caption = remote[repo]
        assert isinstance(story, str) and isinstance(caption, str)
        assert picture_size == [16, 16] and page and set(page) <= {"str", "Image"}


def test_card_snippets_that_import_the_library_run_against_local_folders(original, published, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    root = original["root"]
    for repo in ("org/tiny", "org/tiny-lora"):
        names = {}
        card = published["hub"].files(repo)["README.md"].decode()
        card = card.replace('"org/tiny-lora"', repr(str(root / "adapter"))).replace('"org/tiny"', repr(str(root / "model")))
        blocks = [b for b in python_blocks(card) if "trust_remote_code" not in b]
        assert "from chameleon_fusion import" in blocks[0]
        for block in blocks:
            exec(block, names)
        assert names["picture"].size == (16, 16) and (tmp_path / "lighthouse.png").exists()


# --- the command and its checks ----------------------------------------------------------------------------


def test_command_dry_runs_refuses_without_a_token_then_publishes_with_the_login_token(original, published):
    output = "".join(published["local_output"])
    assert "would upload 19 files" in output and "README.md" in output and "image_tokenizer/model.safetensors" in output
    assert "note: no Hugging Face token found" in output and "refused: no Hugging Face token found" in output
    assert TOKEN not in output
    # no request ever went out without the token: the dry run and the refused publish sent nothing
    assert all(token == TOKEN for _, _, token in published["requests_before_remote"])
    hub = published["hub"]
    assert hub.repos["org/from-cli"].private
    uploaded, local = hub.files("org/from-cli"), original["root"] / "model"
    assert uploaded["model.safetensors"] == (local / "model.safetensors").read_bytes()
    assert uploaded["image_tokenizer/model.safetensors"] == (local / "image_tokenizer" / "model.safetensors").read_bytes()


def test_sharded_weights_are_staged_and_missing_code_files_come_from_the_package(original, hub, tmp_path):
    shutil.copytree(original["root"] / "model", tmp_path / "sharded")
    (tmp_path / "sharded" / "model.safetensors").unlink()
    (tmp_path / "sharded" / "vocabulary.py").unlink()
    model = ChameleonFusionForConditionalGeneration.from_pretrained(original["root"] / "model")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = dict(prepare_hub_folder(tmp_path / "sharded", tmp_path / "hub", "org/sharded"))
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards | {"model.safetensors.index.json", "vocabulary.py"} <= set(files)
    assert (tmp_path / "hub" / "vocabulary.py").read_bytes() == (PACKAGE_DIR / "vocabulary.py").read_bytes()
    assert f"| parameters | {model.num_parameters() / 1e3:.1f}K |" in ModelCard.load(tmp_path / "hub" / "README.md").text
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_hub_folder(tmp_path / "sharded", tmp_path / "hub", "org/sharded")
    # published sharded, then again as one file: no shard of the first upload is left to confuse from_pretrained
    publish(tmp_path / "sharded", "org/sharded", token=TOKEN, endpoint=hub.url)
    publish(original["root"] / "model", "org/sharded", token=TOKEN, endpoint=hub.url)
    assert [name for name in hub.files("org/sharded") if "safetensors" in name] == [
        "image_tokenizer/model.safetensors", "model.safetensors"]


def test_bad_folders_and_repo_ids_are_refused_before_any_request(original, hub, tmp_path):
    model = original["root"] / "model"
    target = {"token": TOKEN, "endpoint": hub.url}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((model / "config.json").read_text())
    (tmp_path / "no_processor").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "no_processor" / name).write_bytes((model / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="missing_folder is not a folder"):
        publish(tmp_path / "missing_folder", "org/x", **target)
    with pytest.raises(ValueError, match="notes is not a chameleon_fusion model .model_type 'llama'"):
        publish(tmp_path / "notes", "org/x", **target)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        publish(tmp_path / "no_weights", "org/x", **target)
    with pytest.raises(FileNotFoundError, match="no processor"):
        publish(tmp_path / "no_processor", "org/x", **target)
    with pytest.raises(ValueError, match="base model is .*not a Hub id"):
        publish(original["root"] / "adapter", "org/x", **target)  # adapter_config names a local folder
    for repo_id in ("org/has space", "org/ünïcode", "name-without-namespace", "a/b/c", "org/x--y", "org/-x"):
        with pytest.raises(ValueError, match="invalid repo id"):
            publish(model, repo_id, **target)
    assert hub.requests == []
