"""PEFT recipes: LoRA on the decoder, training only the image rows (Anole), adding image rows to a text-only LM."""

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from torch import nn

from ..vocabulary import Vocabulary

# The decoder's linear layers (every `model.layers.N`): fused q/k/v, attention output, fused gate/up, down.
DECODER_LINEAR_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
DECODER_LINEAR_PATTERN = r".*layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"


def lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = DECODER_LINEAR_PATTERN,
    image_rows: Vocabulary | None = None,
    **kwargs,
) -> LoraConfig:
    """LoRA on the decoder's linear layers; with `image_rows` (a Vocabulary) the image rows of embed_tokens
    and lm_head are trained as well."""
    if image_rows is not None:
        ids = image_token_ids(image_rows)
        kwargs["trainable_token_indices"] = {"embed_tokens": ids, "lm_head": ids}
    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, task_type="CAUSAL_LM", **kwargs
    )


def add_lora(model, **kwargs) -> PeftModel:
    """The model wrapped with LoRA adapters (see `lora_config`); only the adapters train."""
    return get_peft_model(model, lora_config(**kwargs))


def image_token_ids(vocabulary: Vocabulary, markers: bool = True) -> list[int]:
    """Token ids of the image codes, plus `<boi>` and `<eoi>` with markers=True."""
    if not isinstance(vocabulary, Vocabulary):
        raise TypeError(f"vocabulary must be a Vocabulary (processor.vocabulary), got {type(vocabulary).__name__}")
    ids = vocabulary.code_to_id.tolist()
    if markers:
        ids += [i for i in (vocabulary.boi_token_id, vocabulary.eoi_token_id) if i is not None]
    return sorted(ids)


def image_rows_config(model, vocabulary: Vocabulary, markers: bool = True) -> TrainableTokensConfig:
    """Anole's recipe as a PEFT config: only the image rows of embed_tokens and lm_head train."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return TrainableTokensConfig(
        target_modules=["embed_tokens"] if tied else ["embed_tokens", "lm_head"],
        token_indices=image_token_ids(vocabulary, markers),
    )


def train_image_rows(model, vocabulary: Vocabulary | None = None, markers: bool = True) -> PeftModel:
    """The model wrapped so that only the image rows (codes, and `<boi>`/`<eoi>` with markers) of the input
    and output embeddings train; the adapter stores just those rows' deltas."""
    vocabulary = vocabulary if vocabulary is not None else getattr(model, "vocabulary", None)
    return get_peft_model(model, image_rows_config(model, vocabulary, markers))


def add_image_rows(model, layout: dict, noise_scale: float = 0.1, seed: int = 0):
    """Grow a text-only LM's embeddings to `layout["vocab_size"]` (processor.vocabulary.layout()).

    Each new row is the mean of the existing rows plus noise_scale * their per-dimension std * N(0, 1), in
    the input embeddings and in an untied lm_head. A ChameleonFusion model also takes the layout fields.
    """
    if not isinstance(layout, dict) or "vocab_size" not in layout:
        raise TypeError("layout must be a dict with vocab_size, e.g. processor.vocabulary.layout()")
    old_size, new_size = model.get_input_embeddings().weight.shape[0], layout["vocab_size"]
    if new_size < old_size:
        raise ValueError(f"layout's vocab_size ({new_size}) is smaller than the model's ({old_size})")
    model.resize_token_embeddings(new_size, mean_resizing=False)
    matrices = _fresh_embedding_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in matrices:
            _fill_new_rows(weight, old_size, noise_scale, generator)
    if isinstance(getattr(model, "vocabulary", None), Vocabulary):
        for name, value in layout.items():
            setattr(model.config, name, value)
        model.vocabulary = Vocabulary.from_config(model.config)
    return model


def _fresh_embedding_parameters(model) -> list[nn.Parameter]:
    """New Parameter objects for the resized matrices: resize_token_embeddings swaps `.data` in place, and
    autograd remembers the old shape of a parameter that was used before (a shape error at backward)."""
    inputs, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and output.weight is inputs.weight
    inputs.weight = nn.Parameter(inputs.weight.detach(), requires_grad=inputs.weight.requires_grad)
    if output is None:
        return [inputs.weight]
    if tied:
        output.weight = inputs.weight
        return [inputs.weight]
    output.weight = nn.Parameter(output.weight.detach(), requires_grad=output.weight.requires_grad)
    return [inputs.weight, output.weight]


def _fill_new_rows(weight: torch.Tensor, old_size: int, noise_scale: float, generator: torch.Generator):
    old = weight[:old_size].float()
    mean, std = old.mean(0), old.std(0)
    noise = torch.randn(weight.shape[0] - old_size, weight.shape[1], generator=generator)
    weight[old_size:] = (mean + noise_scale * std * noise.to(mean.device)).to(weight.dtype)
