"""Publish a model or a PEFT adapter to the Hugging Face Hub, with a model card.

    chameleon-fusion publish DIR --repo-id ORG/NAME [--private] [--dry-run]

DIR is a model saved with save_pretrained (config.json of model_type chameleon_fusion, safetensors weights and
its processor) or a PEFT adapter (adapter_config.json, adapter_model.safetensors). The folder, the repo id and a
token (HF_TOKEN, or the file `hf auth login` writes; never printed) are checked before anything is uploaded.
The upload holds the weights, the generation config, the processor with its image tokenizer, the code files
for trust_remote_code and a README.md model card. --dry-run lists those files and uploads nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, get_token
from transformers.dynamic_module_utils import get_relative_imports

from .model_card import CardFacts, evaluation_numbers, format_bytes, hub_dataset_ids, render_model_card

PACKAGE_DIR = Path(__file__).parent
IMAGE_TOKENIZER = "image_tokenizer"
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
# files of an earlier upload that this one replaces: old weight shards must not outlive their index
STALE_FILES = ["*.safetensors", "*.safetensors.index.json", f"{IMAGE_TOKENIZER}/*"]
NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"{NAME}/{NAME}")


@dataclass
class Publication:
    """What was (or, with dry_run, would be) uploaded: (path in the repo, size in bytes) per file."""

    repo_id: str
    files: list[tuple[str, int]]
    commit_url: str | None = None


def publish(folder, repo_id: str, *, private: bool = False, dry_run: bool = False, token: str | None = None,
            base_model: str | None = None, processor=None, license: str = "apache-2.0", datasets=None,
            training_config: dict | None = None, evaluation: dict | None = None, commit_message: str | None = None,
            endpoint: str | None = None) -> Publication:
    """Check everything, write the Hub-ready folder, then `create_repo` + `upload_folder` (unless dry_run).

    processor: a folder with the processor when `folder` has none. base_model: the Hub id the model was
    fine-tuned from (an adapter's base, when adapter_config.json names a local folder). training_config (the
    options of the run) and evaluation (metric -> number, default: eval_results.json in the folder) go into the
    card, with the progress in trainer_state.json. endpoint: another Hub than HF_ENDPOINT / huggingface.co.
    """
    check_repo_id(repo_id)
    token = token if dry_run else find_token(token)
    with tempfile.TemporaryDirectory(prefix="chameleon-fusion-publish-") as staging:
        files = prepare_hub_folder(folder, staging, repo_id, base_model=base_model, processor=processor,
                                   license=license, datasets=datasets, training_config=training_config,
                                   evaluation=evaluation)
        if dry_run:
            return Publication(repo_id, files)
        api = HfApi(endpoint=endpoint, token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id, folder_path=staging, delete_patterns=STALE_FILES,
            commit_message=commit_message or "Publish with chameleon-fusion",
        )
    return Publication(repo.repo_id, files, commit.commit_url)


def check_repo_id(repo_id: str) -> None:
    """Raise a ValueError saying what is wrong with a repo id the Hub would refuse."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        problem = "it must be NAMESPACE/NAME, with exactly one '/'"
    elif not REPO_ID.fullmatch(repo_id):
        problem = ("use only ASCII letters, digits, '-', '_' and '.', start and end each part with a letter or a "
                   "digit, at most 96 characters per part")
    elif "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        problem = "'--', '..' and a '.git' ending are not allowed"
    else:
        return
    raise ValueError(f"invalid repo id {repo_id!r}: {problem}")


def find_token(token: str | None = None) -> str:
    """The token given, else HF_TOKEN, else the one `hf auth login` saved; a ValueError when there is none."""
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` (write access needed)")
    return token


# --- the train command's --publish-repo-id ------------------------------------------------------------------


def check_training_publication(options) -> None:
    """Before a run of `train --publish-repo-id`: the repo id, a token, and for an adapter a base model on the Hub."""
    check_repo_id(options.publish_repo_id)
    find_token()
    saves_adapter = (getattr(options, "lora", False) or getattr(options, "image_rows", False)) and not getattr(
        options, "merge_adapter", False)
    if saves_adapter and _hub_model(getattr(options, "model", None)) is None:
        raise ValueError(f"--publish-repo-id with an adapter needs --model to be the base model's Hub id, got "
                         f"{getattr(options, 'model', None)!r}; or pass --merge-adapter to publish a full model")


def publish_training_output(options) -> Publication:
    """After `train --publish-repo-id`: the output folder, with the run's options as the card's training config."""
    training_config = {name: value for name, value in vars(options).items() if not callable(value)}
    return publish(options.output_dir, options.publish_repo_id, base_model=_hub_model(getattr(options, "model", None)),
                   training_config=training_config)


def _hub_model(name: str | None) -> str | None:
    return name if name and REPO_ID.fullmatch(name) and not Path(name).exists() else None


# --- the Hub-ready folder -----------------------------------------------------------------------------------


def prepare_hub_folder(folder, out_dir, repo_id: str, *, base_model: str | None = None, processor=None,
                       license: str = "apache-2.0", datasets=None, training_config: dict | None = None,
                       evaluation: dict | None = None) -> list[tuple[str, int]]:
    """Write into out_dir what a repository needs (files are linked, not copied, where the system allows)."""
    source, out = Path(folder), Path(out_dir)
    kind = folder_kind(source)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: the Hub-ready folder is written into an empty or new folder")
    processor_dir = Path(processor) if processor is not None else source
    facts = CardFacts(repo_id=repo_id, license=license, training_config=training_config,
                      trainer_state=_read_json(source / "trainer_state.json"))
    if kind == "model":
        _stage_model(source, out, facts)
        facts.base_model = base_model or (training_config or {}).get("base_model")
    else:
        _stage_adapter(source, out, facts, base_model)
    if (processor_dir / "processor_config.json").exists():
        _stage_processor(processor_dir, out, facts)
    elif kind == "model":
        raise FileNotFoundError(f"{processor_dir} has no processor (processor_config.json): save the processor "
                                "there, or pass the folder that holds it (--processor)")
    facts.datasets = list(datasets or hub_dataset_ids(training_config))
    facts.evaluation = evaluation_numbers(evaluation or _read_json(source / "eval_results.json") or {})
    write_model_card(facts, out / "README.md")
    return [(str(p.relative_to(out)), p.stat().st_size) for p in sorted(out.rglob("*")) if p.is_file()]


def folder_kind(folder: Path) -> str:
    """"model" or "adapter"; a FileNotFoundError or ValueError naming what is missing otherwise."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if (folder / "adapter_config.json").exists():
        _require(folder, "adapter_model.safetensors", "the adapter weights (PEFT's save_pretrained writes them)")
        return "adapter"
    config = _read_json(folder / "config.json")
    if config is None or config.get("model_type") != "chameleon_fusion":
        found = f"model_type {config.get('model_type')!r}" if config else "no config.json"
        raise ValueError(f"{folder} is not a chameleon_fusion model ({found}) nor a PEFT adapter "
                         "(adapter_config.json): publish a folder written by save_pretrained")
    if not any(any(folder.glob(pattern)) for pattern in MODEL_WEIGHTS):
        raise FileNotFoundError(f"{folder} has a config.json but no safetensors weights (model.safetensors or "
                                "model.safetensors.index.json with its shards)")
    return "model"


def write_model_card(facts: CardFacts, path: Path) -> ModelCard:
    """Render the card and check that its metadata reads back."""
    card = render_model_card(facts)
    card.save(path)
    ModelCard.load(path)  # raises on metadata the Hub could not parse
    return card


def _stage_model(source: Path, out: Path, facts: CardFacts) -> None:
    index = _read_json(source / "model.safetensors.index.json")
    weights = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    for name in ["config.json", *weights, *(["model.safetensors.index.json"] if index else [])]:
        _require(source, name, "listed by model.safetensors.index.json" if index else "the model weights")
        _link(source / name, out / name)
    facts.model_config = _read_json(source / "config.json")
    facts.parameters = sum(_parameter_count(source / name) for name in weights)
    facts.weights_bytes = sum((source / name).stat().st_size for name in weights)
    _stage_generation_config(source, out)
    _stage_code(source, out, [facts.model_config])


def _stage_generation_config(source: Path, out: Path) -> None:
    if (source / "generation_config.json").exists():
        _link(source / "generation_config.json", out / "generation_config.json")
        return
    from transformers import GenerationConfig

    from .configuration_chameleon_fusion import ChameleonFusionConfig

    GenerationConfig.from_model_config(ChameleonFusionConfig.from_pretrained(source)).save_pretrained(out)


def _stage_adapter(source: Path, out: Path, facts: CardFacts, base_model: str | None) -> None:
    adapter_config = _read_json(source / "adapter_config.json")
    named_base = adapter_config.get("base_model_name_or_path")
    if base_model is not None:
        check_repo_id(base_model)
    elif named_base and REPO_ID.fullmatch(named_base) and not Path(named_base).exists():
        base_model = named_base
    else:
        raise ValueError(f"the adapter's base model is {named_base!r}, not a Hub id: pass the base model's Hub id "
                         "(base_model= / --base-model ORG/NAME) so that the adapter can be loaded from the Hub")
    adapter_config["base_model_name_or_path"] = base_model
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    _link(source / "adapter_model.safetensors", out / "adapter_model.safetensors")
    facts.adapter_config, facts.base_model = adapter_config, base_model
    facts.weights_bytes = (source / "adapter_model.safetensors").stat().st_size
    if named_base and (Path(named_base) / "config.json").exists():
        facts.model_config = _read_json(Path(named_base) / "config.json")  # the layout, for the card


def _stage_processor(source: Path, out: Path, facts: CardFacts) -> None:
    """The processor files, its image tokenizer, their code; loaded once to check it against the model."""
    from .processing_chameleon_fusion import ChameleonFusionProcessor

    for name in PROCESSOR_FILES:
        if (source / name).exists():
            _link(source / name, out / name)
    configs = [_read_json(out / name) or {} for name in ("processor_config.json", "tokenizer_config.json")]
    _stage_code(source, out, configs + [configs[0].get("image_processor") or {}])
    image_source = source / IMAGE_TOKENIZER
    if image_source.is_dir():
        index = _read_json(image_source / "model.safetensors.index.json")
        weights = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
        for name in ["config.json", *weights, *(["model.safetensors.index.json"] if index else [])]:
            _require(image_source, name, "the image tokenizer")
            _link(image_source / name, out / IMAGE_TOKENIZER / name)
        facts.image_config = _read_json(image_source / "config.json")
        _stage_code(image_source, out / IMAGE_TOKENIZER, [facts.image_config])
    processor = ChameleonFusionProcessor.from_pretrained(str(source))
    if facts.model_config is not None:
        try:
            processor.check_model(_config_object(facts.model_config))
        except ValueError as error:
            raise ValueError(f"the processor in {source} does not fit the model: {error}") from error
    facts.processor = processor


def _stage_code(source: Path, out: Path, configs: list[dict]) -> None:
    """The modules auto_map names and everything they import relatively: from the folder, else this package."""
    pending = {entry.split(".")[0] for config in configs for entry in _auto_map_entries(config)}
    done = set()
    while pending:
        module = pending.pop()
        done.add(module)
        path = source / f"{module}.py" if (source / f"{module}.py").exists() else PACKAGE_DIR / f"{module}.py"
        if not path.exists():
            raise FileNotFoundError(f"{module}.py, named by auto_map, is neither in {source} nor in chameleon_fusion")
        _link(path, out / path.name)
        pending |= set(get_relative_imports(path)) - done


def _auto_map_entries(config: dict) -> list[str]:
    entries = []
    for value in (config.get("auto_map") or {}).values():
        entries += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v and "--" not in v]
    return entries


# --- small helpers ------------------------------------------------------------------------------------------


def _link(source: Path, target: Path) -> None:
    """A hard link, else a symbolic link, else a copy: the weights are not duplicated on disk."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    for make_link in (os.link, lambda s, t: os.symlink(Path(s).resolve(), t)):
        try:
            make_link(source, target)
            return
        except OSError:
            continue
    shutil.copy2(source, target)


def _require(folder: Path, name: str, what: str) -> None:
    if not (folder / name).exists():
        raise FileNotFoundError(f"{folder / name} is missing ({what})")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _parameter_count(path: Path) -> int:
    """Number of values in a safetensors file, read from its header only."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    count = 0
    for name, tensor in header.items():
        if name != "__metadata__":
            size = 1
            for dim in tensor["shape"]:
                size *= dim
            count += size
    return count


def _config_object(config: dict):
    from .configuration_chameleon_fusion import ChameleonFusionConfig

    return ChameleonFusionConfig.from_dict(config)


# --- the command --------------------------------------------------------------------------------------------


def add_arguments(parser):
    parser.add_argument("folder", metavar="DIR", help="a saved model or PEFT adapter folder")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    parser.add_argument("--processor", help="folder of the processor, when DIR has none")
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from (an adapter's base)")
    parser.add_argument("--license", default="apache-2.0", help="license of the weights (default apache-2.0)")
    parser.add_argument("--dataset", action="append", help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--training-config", help="a JSON or YAML file of the training options, for the card")


def run(args) -> int:
    training_config = _read_mapping(args.training_config) if args.training_config else None
    publication = publish(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run,
                          base_model=args.base_model, processor=args.processor, license=args.license,
                          datasets=args.dataset, training_config=training_config)
    total = sum(size for _, size in publication.files)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(publication.files)} files ({format_bytes(total)}) to {publication.repo_id}:")
    for path, size in publication.files:
        print(f"  {format_bytes(size):>10}  {path}")
    if publication.commit_url:
        print(f"commit: {publication.commit_url}")
    if args.dry_run and not get_token():
        print("note: no Hugging Face token found; set HF_TOKEN or run `hf auth login` before publishing")
    return 0


def _read_mapping(path: str) -> dict:
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


