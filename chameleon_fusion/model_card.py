"""Model cards: what a published folder is, told from its own files, rendered with the templates in model_cards/."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATES = Path(__file__).parent / "model_cards"
MODEL_TEMPLATE, ADAPTER_TEMPLATE = TEMPLATES / "model.md.jinja", TEMPLATES / "adapter.md.jinja"
TAGS = ["chameleon-fusion", "early-fusion", "multimodal", "text-generation", "text-to-image", "image-to-text",
        "custom_code"]
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$")
SKIPPED_METRICS = re.compile(r"(runtime|per_second|epoch|step)$")
HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
PEFT_NAMES = {"LORA": "LoRA", "TRAINABLE_TOKENS": "trainable-tokens"}


@dataclass
class CardFacts:
    """Everything a card says, gathered from the published folder and the publisher's options."""

    repo_id: str
    model_config: dict | None = None  # config.json of the model (of the base model, for an adapter)
    processor: object | None = None  # a loaded ChameleonFusionProcessor
    image_config: dict | None = None  # image_tokenizer/config.json
    adapter_config: dict | None = None  # adapter_config.json: this card is an adapter's
    weights_bytes: int = 0
    parameters: int | None = None
    base_model: str | None = None
    license: str = "apache-2.0"
    datasets: list[str] = field(default_factory=list)
    training_config: dict | None = None
    trainer_state: dict | None = None
    evaluation: dict[str, float] = field(default_factory=dict)


def render_model_card(facts: CardFacts) -> ModelCard:
    """The README.md of the repository: YAML metadata plus the model or adapter template."""
    template = ADAPTER_TEMPLATE if facts.adapter_config is not None else MODEL_TEMPLATE
    return ModelCard.from_template(card_metadata(facts), template_path=str(template), **template_context(facts))


def card_metadata(facts: CardFacts) -> ModelCardData:
    adapter = facts.adapter_config is not None
    return ModelCardData(
        model_name=facts.repo_id.split("/")[-1],
        library_name="peft" if adapter else "transformers",
        pipeline_tag="any-to-any",
        tags=TAGS + (["lora", "peft"] if adapter else []),
        license=facts.license,
        datasets=facts.datasets or None,
        base_model=facts.base_model,
        eval_results=eval_results(facts) or None,
    )


def eval_results(facts: CardFacts) -> list[EvalResult]:
    """The model-index entries: one per evaluation number."""
    dataset = facts.datasets[0] if facts.datasets else None
    return [
        EvalResult(task_type="any-to-any", task_name="Early-fusion language modelling",
                   dataset_type=dataset or "custom", dataset_name=dataset or "held-out documents",
                   metric_type=name, metric_name=name.replace("_", " "), metric_value=value)
        for name, value in facts.evaluation.items()
    ]


# --- what the templates read --------------------------------------------------------------------------------


def template_context(facts: CardFacts) -> dict:
    vocabulary = _vocabulary(facts)
    image = _image_facts(facts, vocabulary)
    seq_length = vocabulary.image_seq_length if vocabulary is not None else 1024
    config = facts.model_config or {}
    context = {
        "repo_id": facts.repo_id,
        "model_name": facts.repo_id.split("/")[-1],
        "summary": _summary(facts),
        "base_model": facts.base_model,
        "processor_repo": facts.repo_id if facts.processor is not None else facts.base_model,
        "vocab_size": vocabulary.vocab_size if vocabulary is not None else None,
        "layout": layout_rows(vocabulary, facts.processor) if vocabulary is not None else [],
        "tokens": _token_names(facts.processor),
        "image": image,
        "seq_length": seq_length,
        "image_tokens": seq_length + 2,  # with <boi> and <eoi>
        "interleaved_tokens": seq_length + 64,
        "example_size": image["resolution"] if image else 256,
        "max_positions": config.get("max_position_embeddings", "model's"),
        "architecture": architecture_rows(config, facts.parameters),
        "training_rows": training_rows(facts.training_config),
        "progress": training_progress(facts.trainer_state),
        "evaluation": [(name, _number(value)) for name, value in facts.evaluation.items()],
    }
    if facts.adapter_config is not None:
        peft_type = facts.adapter_config.get("peft_type", "PEFT")
        context["adapter"] = {"peft_type": PEFT_NAMES.get(peft_type, peft_type),
                              "size": format_bytes(facts.weights_bytes), "rows": adapter_rows(facts)}
    return context


def layout_rows(vocabulary, processor=None) -> list[tuple[str, str]]:
    """(token ids, what they are) for the text ids, each special id and the image ids."""
    rows = []
    if vocabulary.text_vocab_size:
        among = "" if vocabulary.contiguous else " (the image-code ids below are among them)"
        rows.append((f"0 – {vocabulary.text_vocab_size - 1}", f"the tokenizer's {vocabulary.text_vocab_size} tokens{among}"))
    specials = [("bos_token_id", "beginning of sequence"), ("pad_token_id", "padding"),
                ("image_token_id", "image placeholder in prompts (the processor replaces it with the image)"),
                ("boi_token_id", "begin of image"), ("eoi_token_id", "end of image")]
    named = [(getattr(vocabulary, name), what) for name, what in specials]
    named += [(eos, "end of sequence") for eos in vocabulary.eos_token_ids]
    for token_id, what in sorted((i, w) for i, w in named if i is not None):
        rows.append((str(token_id), f"{_token_string(processor, token_id)}{what}"))
    ids = vocabulary.code_to_id
    first, last = int(ids.min()), int(ids.max())
    if vocabulary.contiguous:
        rows.append((f"{first} – {last}", f"image codes: code k of the {vocabulary.codebook_size}-code VQ codebook is id "
                                         f"{vocabulary.image_token_offset} + k"))
    else:
        rows.append((f"{vocabulary.codebook_size} ids in {first} – {last}",
                     "image codes, through the explicit map `image_token_ids` of config.json (a converted checkpoint)"))
    return rows


def architecture_rows(config: dict, parameters: int | None) -> list[tuple[str, str]]:
    rows = [("parameters", _count(parameters))] if parameters else []
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    described = [
        ("layers", config.get("num_hidden_layers")),
        ("hidden size", config.get("hidden_size")),
        ("MLP size (SwiGLU)", config.get("intermediate_size")),
        ("attention heads", f"{heads} ({kv_heads} key/value heads)" if heads else None),
        ("QK-Norm", config.get("qk_norm") or "none"),
        ("norm placement", "swin (inside the residual branch)" if config.get("swin_norm") else "pre-norm (RMSNorm)"),
        ("context", f"{config['max_position_embeddings']} tokens" if config.get("max_position_embeddings") else None),
        ("weights", config.get("dtype")),
    ]
    return rows + [(name, str(value)) for name, value in described if value is not None and config]


def adapter_rows(facts: CardFacts) -> list[tuple[str, str]]:
    adapter = facts.adapter_config
    targets = adapter.get("target_modules")
    rows = [("base model", facts.base_model), ("rank r", adapter.get("r")), ("alpha", adapter.get("lora_alpha")),
            ("dropout", adapter.get("lora_dropout")),
            ("target modules", f"`{_cell(targets)}`" if isinstance(targets, str) else _cell(targets))]
    token_rows = adapter.get("trainable_token_indices") or {}
    if token_rows:
        counts = ", ".join(f"{name}: {len(ids)} rows" for name, ids in token_rows.items())
        rows.append(("trained embedding rows", counts))
    return [(name, str(value)) for name, value in rows if value not in (None, "", [], {})]


def training_rows(training_config: dict | None) -> list[tuple[str, str]]:
    """The training options as (name, value), nested mappings flattened, secrets and unset values left out."""
    rows = []
    for name, value in _flatten(training_config or {}):
        if value is None or value == [] or callable(value) or SECRET_KEY.search(name):
            continue
        rows.append((name, _cell(value if isinstance(value, str) else json.dumps(value, default=str))))
    return rows


def training_progress(state: dict | None) -> str | None:
    """One sentence from Trainer's trainer_state.json: steps, epochs, the last losses logged."""
    if not state or not state.get("global_step"):
        return None
    history = state.get("log_history") or []
    sentence = f"Trained for {state['global_step']} steps"
    if state.get("epoch"):
        sentence += f" ({state['epoch']:.2f} epochs)"
    losses = [(key, next(e[key] for e in reversed(history) if key in e)) for key in ("loss", "eval_loss")
              if any(key in e for e in history)]
    if losses:
        sentence += "; last logged " + ", ".join(f"{key.replace('_', ' ')} {_number(value)}" for key, value in losses)
    return sentence + "."


def evaluation_numbers(metrics: dict) -> dict[str, float]:
    """Numeric evaluation metrics, without timings and counters, names without the `eval_` prefix."""
    numbers = {}
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not SKIPPED_METRICS.search(name):
            if math.isfinite(value):
                numbers[name.removeprefix("eval_")] = float(value)
    return numbers


def hub_dataset_ids(training_config: dict | None) -> list[str]:
    """Dataset names in a training config that are Hub ids (NAMESPACE/NAME, not a local path or a file)."""
    config = training_config or {}
    candidates = [config.get(key) for key in ("datasets", "dataset", "data", "eval_data")]
    flat = [c for item in candidates for c in (item if isinstance(item, list) else [item]) if isinstance(c, str)]
    return list(dict.fromkeys(c for c in flat if HUB_ID.match(c) and not Path(c).exists() and not Path(c).suffix))


# --- helpers ------------------------------------------------------------------------------------------------


def _vocabulary(facts: CardFacts):
    if facts.processor is not None:
        return facts.processor.vocabulary
    if facts.model_config:
        from .vocabulary import Vocabulary

        return Vocabulary.from_config(_Fields(facts.model_config))
    return None


def _image_facts(facts: CardFacts, vocabulary) -> dict | None:
    if vocabulary is None or not facts.image_config:
        return None
    return {"seq_length": vocabulary.image_seq_length, "grid": math.isqrt(vocabulary.image_seq_length),
            "resolution": facts.image_config.get("resolution"),
            "decoder_trained": facts.image_config.get("decoder_trained", True)}


def _token_names(processor) -> dict:
    names = {"image": "<image>", "boi": "<boi>", "eoi": "<eoi>"}
    if processor is not None:
        names = {"image": processor.image_token, "boi": processor.boi_token, "eoi": processor.eoi_token}
    return names


def _token_string(processor, token_id: int) -> str:
    if processor is None:
        return ""
    token = processor.tokenizer.convert_ids_to_tokens(token_id)
    return f"`{_cell(token)}` " if token else ""


def _summary(facts: CardFacts) -> str:
    size = f"A {_count(facts.parameters)}-parameter" if facts.parameters else "An"
    origin = f", fine-tuned from [{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model else ""
    return f"{size} early-fusion text-and-image model{origin}."


def _flatten(mapping: dict, prefix: str = ""):
    for name, value in mapping.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _cell(value) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _count(number: int | None) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number and number >= size:
            return f"{number / size:.1f}{suffix}"
    return str(number)


def format_bytes(number: int) -> str:
    """A size in bytes for people: 1.5 MiB."""
    for size, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if number >= size:
            return f"{number / size:.1f} {suffix}"
    return f"{number} bytes"


def _number(value: float) -> str:
    return f"{value:.4g}"


class _Fields:
    """A config dict read through attributes, as Vocabulary.from_config reads a config object."""

    def __init__(self, values: dict):
        self.__dict__.update(values)

    def __getattr__(self, name):
        return None
