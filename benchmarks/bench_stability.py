"""Does QK-Norm keep early-fusion training stable at an aggressive learning rate? (the seeds' claim, at small scale)

    python benchmarks/bench_stability.py                      # 3 seeds x {layernorm QK-Norm, none}, lr 1e-2
    python benchmarks/bench_stability.py --lr 3e-2 --steps 300

The bundled default's earlier decoder shape (256 x 4 layers), trained from scratch with transformers.Trainer on
Fashion-MNIST documents (tokenized by the bundled processor), once with Chameleon's per-head LayerNorm QK-Norm and once without, over
several seeds. EarlyFusionLoggingCallback records the loss and the largest pre-softmax attention logit of every
layer; the script prints a table and writes benchmarks/stability.png (loss and max attention logit per step).
"""

import argparse
import json
import math
import platform
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from chameleon_fusion import ChameleonFusionConfig, ChameleonFusionForConditionalGeneration
from chameleon_fusion.fashion.bundle import load_bundle
from chameleon_fusion.fashion.documents import write_documents
from chameleon_fusion.fashion.recipe import DECODER
from chameleon_fusion.training import (
    EarlyFusionCollator,
    EarlyFusionLoggingCallback,
    read_jsonl,
    tokenize_documents,
)

VARIANTS = {"QK-Norm (layernorm)": "layernorm", "no QK-Norm": None}
# the decoder shape RESULTS.md records (the recipe's until 2026-11-23; it now trains a narrower one for longer)
SHAPE = {**DECODER, "hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 4}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-2, help="aggressive on purpose (the recipe uses 2e-3)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--documents", type=int, default=3200)
    parser.add_argument("--out", default=str(Path(__file__).with_name("stability.png")))
    return parser.parse_args()


def train_once(rows, processor, qk_norm, seed, args, folder) -> list[dict]:
    """One run from scratch; returns Trainer's log history (loss and attention logits every 5 steps)."""
    torch.manual_seed(seed)
    config = ChameleonFusionConfig(**{**SHAPE, "qk_norm": qk_norm}, **processor.vocabulary.layout())
    model = ChameleonFusionForConditionalGeneration(config)
    training = TrainingArguments(
        output_dir=str(folder), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=args.steps // 10, weight_decay=0.0, max_grad_norm=1e9,
        logging_steps=5, save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=rows,
                      data_collator=EarlyFusionCollator(processor.vocabulary))
    EarlyFusionLoggingCallback().attach(trainer)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def summarize(history: list[dict]) -> dict:
    losses = [entry["loss"] for entry in history]
    logits = [max(v for k, v in entry.items() if k.startswith("attention_logit_max")) for entry in history]
    finite = [loss for loss in losses if math.isfinite(loss)]
    diverged = len(finite) < len(losses) or (finite and finite[-1] > min(finite) + 1.0)
    return {"final_loss": losses[-1], "best_loss": min(finite) if finite else float("nan"),
            "max_attention_logit": max(logits), "diverged": bool(diverged)}


def plot(runs: dict, path: str, lr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, logit_axis) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"QK-Norm (layernorm)": "tab:blue", "no QK-Norm": "tab:red"}
    for (variant, seed), history in runs.items():
        steps = [entry["step"] for entry in history]
        loss_axis.plot(steps, [e["loss"] for e in history], color=colors[variant], alpha=0.7,
                       label=variant if seed == min(s for _, s in runs) else None)
        logit_axis.plot(steps, [max(v for k, v in e.items() if k.startswith("attention_logit_max")) for e in history],
                        color=colors[variant], alpha=0.7)
    loss_axis.set(title=f"training loss (lr {lr:g})", xlabel="step", ylabel="loss")
    logit_axis.set(title="largest pre-softmax attention logit", xlabel="step", yscale="log")
    loss_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    args = parse_args()
    model, processor, _, folder = load_bundle()
    del model
    with tempfile.TemporaryDirectory() as scratch:
        documents = read_jsonl(write_documents(Path(scratch) / "docs", "train", count=args.documents, seed=1))
        rows = tokenize_documents(documents, processor)
        runs = {}
        for variant, qk_norm in VARIANTS.items():
            for seed in args.seeds:
                runs[variant, seed] = train_once(rows, processor, qk_norm, seed, args, Path(scratch) / "run")
    print(f"# bench_stability  {platform.machine()} CPU, torch {torch.__version__}; processor of {folder}")
    print(f"decoder {SHAPE['hidden_size']} x {SHAPE['num_hidden_layers']} layers; lr {args.lr:g} (warm-up "
          f"{args.steps // 10}), no gradient clipping, {args.steps} steps of {args.batch_size} documents; "
          f"seeds {args.seeds}")
    print("| variant | seed | final loss | best loss | max attention logit | diverged |\n|---|---|---|---|---|---|")
    summaries = {key: summarize(history) for key, history in runs.items()}
    for (variant, seed), s in summaries.items():
        print(f"| {variant} | {seed} | {s['final_loss']:.3f} | {s['best_loss']:.3f} | "
              f"{s['max_attention_logit']:.1f} | {'yes' if s['diverged'] else 'no'} |")
    plot(runs, args.out, args.lr)
    print(f"plot: {args.out}")
    print(json.dumps({variant: sum(summaries[variant, seed]["diverged"] for seed in args.seeds)
                      for variant in VARIANTS}) + "  <- diverged runs per variant")


if __name__ == "__main__":
    main()
