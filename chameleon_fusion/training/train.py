"""Train or fine-tune an early-fusion model on documents with transformers.Trainer (also under `accelerate launch`).

Data: a JSONL file of documents ({"segments": [{"text": ...}, {"image": "path.png"}]} per line) or a `datasets`
table with the same columns. Options come from flags or from --config FILE (JSON or YAML) whose keys are the
flag names; flags given on the command line win. A `training_args` mapping in the file goes to
TrainingArguments as is (FSDP, DeepSpeed, schedulers, ...). Multi-GPU: `accelerate launch --config_file
examples/accelerate/ddp.yaml -m chameleon_fusion train ...`.
"""

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ..configuration_chameleon_fusion import ChameleonFusionConfig
from ..modeling_chameleon_fusion import ChameleonFusionForConditionalGeneration
from ..processing_chameleon_fusion import ChameleonFusionProcessor
from ..publish import check_training_publication, publish_training_output
from .callbacks import EarlyFusionLoggingCallback
from .collator import TRAIN_ON, EarlyFusionCollator
from .documents import load_documents, modality_ramp, parse_weights, tokenize_documents
from .peft_recipes import DECODER_LINEAR_PATTERN, add_image_rows, add_lora, train_image_rows

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--config", help="a JSON or YAML file of options (keys = flag names)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="a .jsonl file of documents, or a `datasets` name / local folder")
    data.add_argument("--split", default="train")
    data.add_argument("--eval-data", help="held-out documents, evaluated every --eval-steps")
    data.add_argument("--eval-split", default="train")
    data.add_argument("--image-root", help="folder that relative image paths in a `datasets` table start from")
    data.add_argument("--max-length", type=int, help="truncate documents (never inside an image), or pack length")
    data.add_argument("--pack", action="store_true", help="pack documents into rows of --max-length tokens")
    data.add_argument("--pad-to-multiple-of", type=int, help="pad each batch to a multiple of this length (few "
                      "shapes, so torch.compile builds few graphs)")
    data.add_argument("--cache-dir", help="where datasets caches the tokenized documents")
    data.add_argument("--modality-start", help="modality weights at the start, e.g. 'text=0.8,interleaved=0.2'")
    data.add_argument("--modality-end", help="modality weights at the end, e.g. 'text=0.2,interleaved=0.8'")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="a saved model (folder or hub id) to fine-tune")
    model.add_argument("--model-config", help="a JSON file of ChameleonFusionConfig fields: a new model (layout from the processor)")
    model.add_argument("--processor", help="a saved ChameleonFusionProcessor (default: --model)")
    model.add_argument("--image-embeddings", choices=("random", "codebook"), default="random",
                       help="a new model's image rows: random, or the VQ codebook through a random projection")

    recipe = parser.add_argument_group("what trains")
    recipe.add_argument("--train-on", choices=TRAIN_ON, default="all", help="which tokens carry a loss")
    recipe.add_argument("--prompt-dropout", type=float, default=0.0, help="share of prompts replaced by bos (CFG)")
    recipe.add_argument("--lora", action="store_true", help="LoRA on the decoder's linear layers")
    recipe.add_argument("--lora-r", type=int, default=16)
    recipe.add_argument("--lora-alpha", type=int, default=32)
    recipe.add_argument("--lora-dropout", type=float, default=0.0)
    recipe.add_argument("--lora-targets", default=DECODER_LINEAR_PATTERN, help="regex over module names")
    recipe.add_argument("--image-rows", action="store_true", help="train the image rows of embed_tokens/lm_head (Anole)")
    recipe.add_argument("--merge-adapter", action="store_true", help="save the model with the adapter merged in")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir")
    train.add_argument("--max-steps", type=int, default=-1)
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--batch-size", type=int, default=8, help="per device")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--eval-steps", type=int, default=500)
    train.add_argument("--save-total-limit", type=int)
    train.add_argument("--report-to", nargs="+", default=["none"], help="e.g. tensorboard wandb (default none)")
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    train.add_argument("--activation-checkpointing", action="store_true")
    train.add_argument("--no-attention-logits", action="store_true", help="skip the QK-Norm health metric")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    train.add_argument("--publish-repo-id", help="at the end, publish the output to the Hub as ORG/NAME (see `publish`)")


def run(args) -> int:
    options = resolve_options(args)
    if options.publish_repo_id:
        check_training_publication(options)  # repo id, token, base model: before hours of training
    set_seed(options.seed)
    processor = ChameleonFusionProcessor.from_pretrained(options.processor or options.model)
    model = load_model(options, processor)
    training_args = training_arguments(options)
    with training_args.main_process_first(desc="tokenizing documents"):
        train_dataset = tokenized(options.data, options.split, options, processor)
        eval_dataset = tokenized(options.eval_data, options.eval_split, options, processor) if options.eval_data else None
    if options.modality_start or options.modality_end:
        train_dataset = scheduled(train_dataset, options, training_args, processor)
    model = apply_recipe(model, options, processor)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=EarlyFusionCollator(
            processor.vocabulary, options.train_on, options.prompt_dropout, pad_to_multiple_of=options.pad_to_multiple_of
        ),
    )
    if _is_early_fusion(model):
        EarlyFusionLoggingCallback(attention_logits=not options.no_attention_logits).attach(trainer)
    checkpoint = get_last_checkpoint(options.output_dir) if options.resume and Path(options.output_dir).is_dir() else None
    trainer.train(resume_from_checkpoint=checkpoint)
    save(trainer, processor, options)
    if options.publish_repo_id and trainer.is_world_process_zero():
        publish_training_output(options)
    return 0


# --- options ------------------------------------------------------------------------------------------------


def resolve_options(args) -> argparse.Namespace:
    """Flags, filled in from --config where a flag was left at its default; checks what is required."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    options = argparse.Namespace(**vars(args))
    options.training_args = {}
    if getattr(args, "config", None):
        for key, value in read_config(args.config).items():
            name = key.replace("-", "_")
            if name == "training_args":
                if not isinstance(value, dict):
                    raise ValueError(f"training_args in {args.config} must be a mapping, got {type(value).__name__}")
                options.training_args = value
            elif name not in defaults or name == "config":
                raise ValueError(f"unknown option {key!r} in {args.config}; options are the flag names of `train`")
            elif getattr(options, name) == defaults[name]:
                setattr(options, name, value)
    for name in ("data", "output_dir"):
        if not getattr(options, name):
            raise ValueError(f"--{name.replace('_', '-')} is required (flag or config file)")
    if bool(options.model) == bool(options.model_config):
        raise ValueError("give exactly one of --model (fine-tune) and --model-config (a new model)")
    if options.model_config and not options.processor:
        raise ValueError("--model-config needs --processor, which fixes the vocabulary layout")
    if options.image_embeddings != "random" and not options.model_config:
        raise ValueError("--image-embeddings sets up a new model: it needs --model-config, not --model")
    if options.merge_adapter and not (options.lora or options.image_rows):
        raise ValueError("--merge-adapter needs --lora or --image-rows")
    return options


def read_config(path: str) -> dict:
    """A JSON or YAML mapping."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix in (".yaml", ".yml"):
        import yaml

        config = yaml.safe_load(text)
    else:
        config = json.loads(text)
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    return config


def training_arguments(options) -> TrainingArguments:
    fields = dict(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        seed=options.seed,
        logging_steps=options.logging_steps,
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        eval_strategy="steps" if options.eval_data else "no",
        eval_steps=options.eval_steps,
        report_to=options.report_to,
        bf16=options.bf16,
        activation_checkpointing=options.activation_checkpointing,
        remove_unused_columns=False,  # the collator reads prompt_length
        use_cpu=not _has_accelerator(),  # else Trainer sees one process per CPU rank, and refuses bf16
    )
    fields.update(options.training_args)
    arguments = TrainingArguments(**fields)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and arguments.world_size != launched:
        raise ValueError(f"{launched} processes were launched but Trainer sees {arguments.world_size}; on CPU set use_cpu")
    return arguments


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


# --- data and model -----------------------------------------------------------------------------------------


def tokenized(source: str, split: str, options, processor):
    documents = load_documents(source, split, cache_dir=options.cache_dir)
    return tokenize_documents(
        documents, processor, max_length=options.max_length, pack=options.pack, image_root=options.image_root
    )


def scheduled(dataset, options, training_args, processor):
    """The modality ramp over exactly the rows the run will read, read in order."""
    if training_args.max_steps <= 0:
        raise ValueError("--modality-start/--modality-end need --max-steps: the ramp spans the whole run")
    start = parse_weights(options.modality_start or options.modality_end)
    end = parse_weights(options.modality_end or options.modality_start)
    rows = training_args.max_steps * training_args.train_batch_size * training_args.gradient_accumulation_steps
    rows *= training_args.world_size
    training_args.train_sampling_strategy = "sequential"
    return modality_ramp(dataset, processor.vocabulary, start, end, rows, seed=options.seed)


def load_model(options, processor):
    """The model to train: loaded, or new from --model-config; a text-only LM gets image rows added."""
    if options.model_config:
        fields = read_config(options.model_config) | processor.vocabulary.layout()
        model = ChameleonFusionForConditionalGeneration(ChameleonFusionConfig(**fields))
        if options.image_embeddings == "codebook":
            embed_codebook(model, processor)
        return model
    model = AutoModelForCausalLM.from_pretrained(options.model, dtype=torch.float32)
    if model.get_input_embeddings().weight.shape[0] < processor.vocabulary.vocab_size:
        logger.warning("growing the embeddings of %s to the processor's %d ids", options.model, processor.vocabulary.vocab_size)
        add_image_rows(model, processor.vocabulary.layout())
        if (options.lora or options.image_rows) and not options.merge_adapter:
            raise ValueError("the embeddings were resized: with an adapter, pass --merge-adapter to save a usable model")
    if _is_early_fusion(model):
        processor.check_model(model)
    return model


@torch.no_grad()
def embed_codebook(model, processor, seed: int = 0):
    """Start the image rows of the input embeddings (and of lm_head when tied) from the VQ codebook, through a random
    projection to hidden_size at the embeddings' init scale, so that codes that look alike start out alike."""
    if processor.vq_model is None:
        raise ValueError("--image-embeddings codebook needs a processor that holds its VQ tokenizer (vq_model)")
    codes = processor.vocabulary.code_to_id
    vectors = processor.vq_model.quantize.lookup(torch.arange(len(codes))[None, :, None])[0, :, :, 0].T.float()
    vectors = vectors - vectors.mean(0)  # (codes, embed_dim), centred
    generator = torch.Generator().manual_seed(seed)
    weight = model.get_input_embeddings().weight
    projection = torch.randn(vectors.shape[1], weight.shape[1], generator=generator)
    rows = vectors @ projection
    rows *= model.config.initializer_range / rows.std()
    weight[codes] = rows.to(weight.dtype)


def apply_recipe(model, options, processor):
    if options.lora:
        image_rows = processor.vocabulary if options.image_rows else None
        return add_lora(
            model, r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
            target_modules=options.lora_targets, image_rows=image_rows,
        )
    if options.image_rows:
        return train_image_rows(model, processor.vocabulary)
    return model


def save(trainer, processor, options):
    """The trained model (adapter, or merged with --merge-adapter), the processor and the log history."""
    model = trainer.model
    if options.merge_adapter:
        model.merge_and_unload().save_pretrained(options.output_dir, is_main_process=trainer.is_world_process_zero())
    else:
        trainer.save_model(options.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(options.output_dir)
    trainer.save_state()


def _is_early_fusion(model) -> bool:
    return any(isinstance(m, ChameleonFusionForConditionalGeneration) for m in model.modules())
