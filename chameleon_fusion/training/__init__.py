"""Training: documents -> datasets, the collator, the logging callback, PEFT recipes (`chameleon-fusion train`)."""

import importlib

# public name -> submodule; imported on first use, so that `train-vq` does not load datasets and peft
_EXPORTS = {
    "read_jsonl": "documents",
    "load_documents": "documents",
    "tokenize_documents": "documents",
    "pack_sequences": "documents",
    "modality_ramp": "documents",
    "EarlyFusionCollator": "collator",
    "EarlyFusionLoggingCallback": "callbacks",
    "lora_config": "peft_recipes",
    "add_lora": "peft_recipes",
    "train_image_rows": "peft_recipes",
    "image_token_ids": "peft_recipes",
    "add_image_rows": "peft_recipes",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
