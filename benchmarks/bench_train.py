"""Training throughput: tokens/s through transformers.Trainer vs a plain PyTorch loop, and documents/s of the data pipeline.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --device cuda --hidden 1024 --layers 8 --seq 1024 --batch 8

Throughput: one model and one optimizer recipe (AdamW, linear decay, clipping at 1.0), the same rows through
the same DataLoader + EarlyFusionCollator; the plain loop is forward, backward, clip, step. Trainer's overhead is
the ratio; a third run adds EarlyFusionLoggingCallback (per-modality losses every step, attention logits at
each logging step). A step is timed from the end of the previous one (data, forward, backward, update); the
figure is the median step after --warmup, over --repeats runs of each loop, interleaved, so that busy spells of a
shared machine do not decide the ratio.

Data pipeline: JSONL documents (text, one image, text) -> read_jsonl -> tokenize_documents (BPE + batched VQ
encoding), fresh cache each time; then the same call again, served from datasets' cache.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments, get_linear_schedule_with_warmup
from transformers.trainer_callback import PrinterCallback

from chameleon_fusion import (
    ChameleonFusionConfig,
    ChameleonFusionForConditionalGeneration,
    ChameleonFusionImageProcessor,
    ChameleonFusionProcessor,
    ChameleonFusionVQVAE,
    ChameleonFusionVQVAEConfig,
    train_bpe_tokenizer,
)
from chameleon_fusion.training.callbacks import EarlyFusionLoggingCallback
from chameleon_fusion.training.collator import EarlyFusionCollator

WORDS = "a photo of a sneaker next to an ankle boot the quick brown fox jumps over the lazy dog".split()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=64, help="VQ input size of the data pipeline")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def build_processor(resolution: int) -> ChameleonFusionProcessor:
    tokenizer = train_bpe_tokenizer([" ".join(WORDS)] * 50, vocab_size=400, min_frequency=1, show_progress=False)
    torch.manual_seed(0)
    vq = ChameleonFusionVQVAE(ChameleonFusionVQVAEConfig(
        resolution=resolution, channel_multiplier=[1, 2, 2, 4], base_channels=64, latent_channels=64, embed_dim=64,
        codebook_size=1024, num_res_blocks=1,
    )).eval()
    return ChameleonFusionProcessor(ChameleonFusionImageProcessor(size=resolution), tokenizer, vq_model=vq)


def build_model(args, processor) -> ChameleonFusionForConditionalGeneration:
    torch.manual_seed(0)
    config = ChameleonFusionConfig(
        **processor.vocabulary.layout(), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=args.seq,
    )
    return ChameleonFusionForConditionalGeneration(config)


def training_rows(args, processor) -> list[dict]:
    """Rows of exactly --seq ids: text and whole images interleaved, no padding."""
    rng = np.random.default_rng(0)
    vocabulary = processor.vocabulary
    image = [vocabulary.boi_token_id, *range(vocabulary.image_token_offset,
                                             vocabulary.image_token_offset + vocabulary.image_seq_length),
             vocabulary.eoi_token_id]
    rows = []
    for _ in range(args.batch * (args.steps + 1)):
        ids = [vocabulary.bos_token_id]
        while len(ids) < args.seq:
            ids += [int(t) for t in rng.integers(0, vocabulary.text_vocab_size, 24)]
            ids += image if len(ids) + len(image) <= args.seq else []
        rows.append({"input_ids": ids[: args.seq]})
    return rows


class StepClock(TrainerCallback):
    """The time at the end of every optimizer step."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.ends.append(time.perf_counter())


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _intervals(ends: list[float], warmup: int) -> dict[int, float]:
    """Step number -> seconds from the end of the previous step to its end (fetch, forward, backward, update)."""
    return {step + 1: ends[step] - ends[step - 1] for step in range(max(warmup, 1), len(ends))}


def trainer_steps(args, processor, rows, with_callback: bool) -> dict[int, float]:
    model = build_model(args, processor)
    with tempfile.TemporaryDirectory() as folder:
        training_args = TrainingArguments(
            folder, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
            lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=args.logging_steps, save_strategy="no",
            report_to=[], disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=False,
            use_cpu=args.device == "cpu", seed=0,
        )
        clock = StepClock()
        trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                          data_collator=EarlyFusionCollator(processor.vocabulary), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)
        if with_callback:
            EarlyFusionLoggingCallback().attach(trainer)
        trainer.train()
    return _intervals(clock.ends, args.warmup)


def plain_loop_steps(args, processor, rows) -> dict[int, float]:
    model = build_model(args, processor).to(args.device).train()
    loader = DataLoader(rows, batch_size=args.batch, shuffle=True, collate_fn=EarlyFusionCollator(processor.vocabulary),
                        generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as Trainer's default adamw_torch_fused
    schedule = get_linear_schedule_with_warmup(optimizer, 0, args.steps)
    ends = []
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        batch = {k: v.to(args.device) for k, v in batch.items()}
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize()
        ends.append(time.perf_counter())
    return _intervals(ends, args.warmup)


def write_documents(folder: Path, count: int, resolution: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir()
    lines = []
    for index in range(count):
        pixels = rng.integers(0, 256, (resolution * 3 // 2, resolution * 2, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
        text = " ".join(rng.choice(WORDS, 20))
        lines.append({"segments": [{"text": text}, {"image": f"images/{index}.png"}, {"text": text}]})
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def pipeline_rates(args, processor) -> tuple[float, float, float]:
    """Documents/s tokenizing from scratch (median of --repeats fresh caches) and again from the cache; images/s
    of the VQ encoding alone, its upper bound."""
    from chameleon_fusion.training.documents import read_jsonl, tokenize_documents

    fresh, cached, encode = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        path = write_documents(Path(folder), args.documents, args.resolution)
        images = [Image.open(p).convert("RGB") for p in sorted((Path(folder) / "images").iterdir())]
        for _ in range(args.repeats):
            start = time.perf_counter()
            for first in range(0, len(images), 64):  # tokenize_documents' batches of 64 documents
                processor.encode_images(images[first : first + 64])
            encode.append(time.perf_counter() - start)
        for repeat in range(args.repeats):
            cache = str(Path(folder) / f"cache{repeat}")
            start = time.perf_counter()
            tokenize_documents(read_jsonl(path, cache_dir=cache), processor)
            fresh.append(time.perf_counter() - start)
            start = time.perf_counter()
            tokenize_documents(read_jsonl(path, cache_dir=cache), processor)
            cached.append(time.perf_counter() - start)
    rates = (statistics.median(times) for times in (fresh, cached, encode))
    return tuple(args.documents / seconds for seconds in rates)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    processor = build_processor(args.resolution)
    rows = training_rows(args, processor)
    tokens = args.batch * args.seq
    steps = {"plain": [], "trainer": [], "logged": []}
    for _ in range(args.repeats):  # interleaved, so that a busy spell on the machine hits all three
        steps["plain"].append(plain_loop_steps(args, processor, rows))
        steps["trainer"].append(trainer_steps(args, processor, rows, with_callback=False))
        steps["logged"].append(trainer_steps(args, processor, rows, with_callback=True))
    typical = {name: statistics.median(t for run in runs for t in run.values()) for name, runs in steps.items()}
    logging_steps = [t for run in steps["logged"] for step, t in run.items() if step % args.logging_steps == 0]
    parameters = sum(p.numel() for p in build_model(args, processor).parameters())
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"# bench_train  {date.today()}  {platform.machine()} {platform.system()}, {device}, torch {torch.__version__}")
    print(f"model: {parameters / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), float32; "
          f"batch {args.batch} x {args.seq} tokens; median step of {args.steps - args.warmup} steps x {args.repeats} runs")
    print("| loop | ms / step | tokens/s | vs plain loop |")
    print("|---|---|---|---|")
    for name, label in (("plain", "plain PyTorch loop"), ("trainer", "transformers.Trainer"),
                        ("logged", "Trainer + EarlyFusionLoggingCallback")):
        print(f"| {label} | {typical[name] * 1e3:.1f} | {tokens / typical[name]:,.0f} | "
              f"{typical['plain'] / typical[name]:.2f}x |")
    if logging_steps:
        extra = statistics.median(logging_steps) - typical["logged"]
        print(f"a logging step with the callback (attention logits measured): {extra * 1e3:+.1f} ms "
              f"({extra / typical['logged']:+.0%} of a step), every {args.logging_steps} steps")
    try:
        import datasets
    except ImportError:
        print("data pipeline: skipped, `datasets` is not installed")
        return
    datasets.disable_progress_bars()
    latent = processor.vq_model.config.latent_size
    fresh, cached, encode = pipeline_rates(args, processor)
    print(f"data pipeline: {args.documents} JSONL documents (text, one {args.resolution * 2}x{args.resolution * 3 // 2} "
          f"PNG -> {args.resolution} px -> {latent}x{latent} codes, text)")
    print(f"  tokenize_documents, fresh cache: {fresh:,.1f} documents/s")
    print(f"  tokenize_documents, from cache:  {cached:,.1f} documents/s")
    print(f"  processor.encode_images alone:   {encode:,.1f} images/s (pixels -> codes of the same decoded images); "
          f"the pipeline runs at {fresh / encode:.0%} of it")


if __name__ == "__main__":
    main()
