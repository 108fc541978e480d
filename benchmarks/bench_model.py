"""Train-step and decode throughput: ours vs transformers' ChameleonForConditionalGeneration, same sizes.

    python benchmarks/bench_model.py              # the default small config on this machine
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16

Prints tokens/s of each and the ratio ours / theirs. Both models use the same attention backend (--attention),
the same dtype, the same random ids, and the same generate() settings (greedy, a fixed number of tokens).
The Fashion-MNIST recipe's decoder at its training shape, eager vs sdpa attention under bf16 autocast:

    python benchmarks/bench_model.py --hidden 128 --layers 4 --heads 2 --kv-heads 2 --intermediate 352 \
        --text-vocab 320 --codebook 256 --batch 32 --seq 74 --autocast --attention eager
"""

import argparse
import platform
import statistics
import time

import torch
from common import SPECIALS, contiguous_layout, decoder_sizes
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

from chameleon_fusion import ChameleonFusionConfig, ChameleonFusionForConditionalGeneration
from chameleon_fusion.convert.checkpoint import chameleon_image_token_name


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--text-vocab", type=int, default=8000)
    parser.add_argument("--codebook", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--decode-runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="attention backend of both")
    parser.add_argument("--autocast", action="store_true", help="train steps under bfloat16 autocast (float32 weights)")
    parser.add_argument("--compile", action="store_true", help="also time static cache + torch.compile decode")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one train step and one decode run spend their time (top ops)")
    return parser.parse_args()


def build_models(args):
    """Ours and transformers' Chameleon with the same sizes; image codes placed the same way in both."""
    layout = contiguous_layout(args.text_vocab, args.codebook)
    vocab = args.text_vocab + SPECIALS + args.codebook
    ours = ChameleonFusionConfig(vocab_size=vocab, **decoder_sizes(args), **layout)
    image_names = {chameleon_image_token_name(k): layout["image_token_offset"] + k for k in range(args.codebook)}
    theirs = ChameleonConfig(
        vocab_size=vocab,
        **decoder_sizes(args),
        bos_token_id=layout["bos_token_id"],
        eos_token_id=layout["eos_token_id"],
        pad_token_id=layout["pad_token_id"],
        vocabulary_map={"<image>": layout["image_token_id"], **image_names},
        vq_config={"base_channels": 32, "channel_multiplier": [1, 2], "embed_dim": 32, "latent_channels": 32,
                   "num_embeddings": args.codebook, "resolution": 32},
    )
    dtype = getattr(torch, args.dtype)
    models = {}
    for name, cls, config in (("ours", ChameleonFusionForConditionalGeneration, ours),
                              ("transformers", ChameleonForConditionalGeneration, theirs)):
        torch.manual_seed(0)
        config._attn_implementation = args.attention
        with torch.device(args.device):
            models[name] = cls(config).to(dtype=dtype)
    return models


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step_timer(model, args):
    """A function that runs one training step (AdamW) and returns its seconds."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.text_vocab, (args.batch, args.seq), device=args.device)

    def step() -> float:
        _sync(args.device)
        start = time.perf_counter()
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        return time.perf_counter() - start

    return step


def decode_timer(model, args, **generate_kwargs):
    """A function that greedily decodes args.new_tokens tokens at batch 1 and returns its seconds."""
    prompt = torch.randint(0, args.text_vocab, (1, 16), device=args.device)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=model.config.pad_token_id, **generate_kwargs)

    @torch.inference_mode()
    def run() -> float:
        model.eval()
        _sync(args.device)
        start = time.perf_counter()
        model.generate(prompt, **settings)
        _sync(args.device)
        return time.perf_counter() - start

    return run


def top_ops(timer, count: int = 5) -> str:
    """The ops one call of timer spends most self time in, as shares of the total."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        timer()
    averages = sorted(profile.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in averages)
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.1f}%" for e in averages[:count])


def interleaved_medians(timers: dict, rounds: int, warmup: int) -> dict:
    """Median seconds of each timer, called in turn round after round, so that a machine whose speed drifts
    (a shared VM) slows both sides alike; the first `warmup` rounds are not counted."""
    times = {name: [] for name in timers}
    for round_ in range(warmup + rounds):
        for name, timer in timers.items():
            seconds = timer()
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    args = parse_args()
    models = build_models(args)
    params = sum(p.numel() for p in models["ours"].parameters()) / 1e6
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    autocast = " (train steps under bf16 autocast)" if args.autocast else ""
    print(f"machine: {machine}; torch {torch.__version__}; dtype {args.dtype}{autocast}; attention {args.attention}; "
          f"{params:.1f}M parameters")
    print(f"config: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads} kv, "
          f"intermediate {args.intermediate}, vocab {models['ours'].config.vocab_size}")
    train = interleaved_medians({name: train_step_timer(m, args) for name, m in models.items()}, args.train_steps, 2)
    decode = interleaved_medians({name: decode_timer(m, args) for name, m in models.items()}, args.decode_runs, 1)
    for name in models:
        print(f"{name:>13}: train step {args.batch * args.seq / train[name]:9.1f} tokens/s (batch {args.batch} x "
              f"{args.seq}, AdamW) | decode {args.new_tokens / decode[name]:7.1f} tokens/s (batch 1, "
              f"{args.new_tokens} new)")
    print(f"ratio ours/transformers: train step {train['transformers'] / train['ours']:.2f}x, "
          f"decode {decode['transformers'] / decode['ours']:.2f}x (steps and runs interleaved, medians)")
    if args.profile:
        for name, model in models.items():
            print(f"{name:>13} train step: {top_ops(train_step_timer(model, args))}")
            print(f"{name:>13} decode: {top_ops(decode_timer(model, args), count=8)}")
    if args.compile:
        for model in models.values():
            model.forward = torch.compile(model.forward, fullgraph=True)
        compiled = {name: decode_timer(m, args, cache_implementation="static") for name, m in models.items()}
        for name, seconds in interleaved_medians(compiled, args.decode_runs, 1).items():
            print(f"{name:>13}: static cache + torch.compile decode {args.new_tokens / seconds:7.1f} tokens/s")


if __name__ == "__main__":
    main()
