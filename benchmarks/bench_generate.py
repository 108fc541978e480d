"""Image generation speed: seconds per image with and without CFG, the modality processors' share of a decoding
step, static vs dynamic cache, and the cost over plain decoding of as many tokens (no processors at all).

    python benchmarks/bench_generate.py                     # a small random model on this machine
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --hidden 4096 --layers 32 --heads 32 \
        --intermediate 11008 --text-vocab 65536 --image-seq-length 1024   # Chameleon-7B-shaped, random weights
    python benchmarks/bench_generate.py --breakdown ...      # GPU: device-busy vs wall time per step, host ops

An image is <boi> + image_seq_length image tokens + <eoi> + eos, drawn with generate(generation_mode="image")
(image tokens sampled at temperature 1). Times are medians of --runs after one warm-up run (which also
compiles the forward where transformers does: static cache on an accelerator). The processors' share is their
own time per step (the processor generate() runs, timed alone on the same shapes, best of 10 rounds) over the
measured time per step; "vs plain decode" compares with generate() of as many tokens without any of them.
"""

import argparse
import datetime
import platform
import statistics
import time

import torch
from common import contiguous_layout, decoder_sizes
from transformers import GenerationMixin

from chameleon_fusion import ChameleonFusionConfig, ChameleonFusionForConditionalGeneration
from chameleon_fusion.generation import (
    EarlyFusionLogitsProcessor,
    ImageGuidanceLogitsProcessor,
    ModalityConstrainedLogitsProcessor,
    ModalitySamplingLogitsProcessor,
    SamplingSettings,
    stop_checks_deferred_on,
)
from chameleon_fusion.vocabulary import Vocabulary


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--text-vocab", type=int, default=8000)
    parser.add_argument("--codebook", type=int, default=8192)
    parser.add_argument("--image-seq-length", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-static", action="store_true", help="leave out the static-cache runs")
    parser.add_argument("--processors-only", action="store_true",
                        help="time the processor alone (no model: any vocabulary shape fits in memory)")
    parser.add_argument("--breakdown", action="store_true",
                        help="only where a static-cache image step's time goes (GPU): device busy vs wall, host ops")
    return parser.parse_args()


def build_config(args) -> ChameleonFusionConfig:
    return ChameleonFusionConfig(
        **decoder_sizes(args),
        max_position_embeddings=max(4096, args.prompt_length + args.image_seq_length + 8),
        **contiguous_layout(args.text_vocab, args.codebook, args.image_seq_length),
    )


def build_model(args) -> ChameleonFusionForConditionalGeneration:
    """A random-weight model with the requested shape, built directly on the device in the requested dtype."""
    torch.manual_seed(0)
    with torch.device(args.device):
        model = ChameleonFusionForConditionalGeneration(build_config(args))
    return model.to(getattr(torch, args.dtype)).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(function, device: str, runs: int) -> float:
    """Median wall time of function() over `runs` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generation_times(model, prompt, args) -> dict:
    """Seconds per image for each way of generating it, and plain decoding of as many tokens."""
    new_tokens = args.image_seq_length + 3  # <boi>, the codes, <eoi>, eos
    caches = {"dynamic": {}} if args.skip_static else {"dynamic": {}, "static": {"cache_implementation": "static"}}
    results = {}
    with torch.inference_mode():
        for cache_name, cache in caches.items():
            results[f"plain decode, {cache_name}"] = median_seconds(
                lambda cache=cache: plain_decode(model, prompt, new_tokens, cache), args.device, args.runs
            )
            results[f"image, {cache_name}"] = median_seconds(
                lambda cache=cache: model.generate(prompt, generation_mode="image", **cache), args.device, args.runs
            )
            results[f"image + CFG, {cache_name}"] = median_seconds(
                lambda cache=cache: model.generate(
                    prompt, generation_mode="image", text_guidance_scale=args.guidance_scale, **cache
                ),
                args.device, args.runs,
            )
    return results


def plain_decode(model, prompt, new_tokens: int, cache: dict):
    """transformers' generate() with no processor at all, its stop check deferred as ours is on CUDA."""
    with stop_checks_deferred_on(prompt.device):
        return GenerationMixin.generate(
            model, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **cache
        )


def processor_seconds_per_step(vocabulary, args, guided: bool, states_from_prompt: bool = True, mode="image") -> float:
    """Time of the processor generate() runs (guidance + grammar + sampling) for one step inside an image."""
    processors, ids, scores = processor_inputs(vocabulary, args, guided, states_from_prompt, mode)
    calls, best = 50, float("inf")
    for _ in range(10):  # the best of 10 rounds: the processor's own cost, not the neighbours' load
        best = min(best, median_seconds(lambda: [processors(ids, scores) for _ in range(calls)], args.device, 1))
    return best / calls


VIEW_OPS = {"aten::slice", "aten::select", "aten::squeeze", "aten::unsqueeze", "aten::chunk", "aten::split",
            "aten::view", "aten::expand", "aten::as_strided", "aten::alias", "aten::t", "aten::transpose"}


def processor_ops_per_step(vocabulary, args, guided: bool, states_from_prompt: bool, mode="image") -> int:
    """How many tensor operations that compute something (views left out) one processor call runs."""
    processors, ids, scores = processor_inputs(vocabulary, args, guided, states_from_prompt, mode)
    processors(ids, scores)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        processors(ids, scores)
    return sum(
        1 for event in profile.events()
        if event.name.startswith("aten::") and event.name not in VIEW_OPS
        and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
    )


def processor_inputs(vocabulary, args, guided: bool, states_from_prompt: bool, mode: str = "image"):
    """The processor generate() runs, ids halfway through an image (or through text), and random scores."""
    groups = 2 if guided else 1
    rows, length = args.batch * groups, args.prompt_length + args.image_seq_length // 2
    ids = torch.randint(0, args.text_vocab, (rows, length), device=args.device)
    if mode == "image":
        ids[:, args.prompt_length] = vocabulary.boi_token_id
        ids[:, args.prompt_length + 1 :] = vocabulary.code_to_id.to(args.device)[
            torch.randint(0, args.codebook, (rows, length - args.prompt_length - 1), device=args.device)
        ]
    processors = EarlyFusionLogitsProcessor(  # what generate() runs
        ModalityConstrainedLogitsProcessor(vocabulary, mode, max_length=length + args.image_seq_length,
                                           prompt_length=args.prompt_length, num_stream_groups=groups),
        ModalitySamplingLogitsProcessor(vocabulary, SamplingSettings(1.0), num_stream_groups=groups),
        ImageGuidanceLogitsProcessor(vocabulary, args.guidance_scale) if guided else None,
        states_from_prompt=states_from_prompt,
    )
    return processors, ids, torch.randn(rows, vocabulary.vocab_size, device=args.device)


def compare_processors(args) -> None:
    """The processor alone at the requested shapes: row states derived at every step vs read off the prompt."""
    vocabulary = Vocabulary.from_config(build_config(args))
    print(f"# bench_generate --processors-only  {datetime.date.today()}  {machine(args)}")
    print(f"vocab {vocabulary.vocab_size}; codebook {args.codebook}; image = {args.image_seq_length} tokens; "
          f"batch {args.batch}; a step halfway through an image (text: through text, greedy)")
    print("| processor | row states | us per step | tensor ops per step |\n|---|---|---|---|")
    for mode, guided, name in (("text", False, "text"), ("image", False, "image"), ("image", True, "image + CFG")):
        for states_from_prompt, states in ((False, "derived every step"), (True, "read off the prompt")):
            seconds = processor_seconds_per_step(vocabulary, args, guided, states_from_prompt, mode)
            ops = processor_ops_per_step(vocabulary, args, guided, states_from_prompt, mode)
            print(f"| {name} | {states} | {1e6 * seconds:.0f} | {ops} |")


def step_breakdown(model, prompt, args) -> None:
    """One static-cache image under the profiler: device-busy time per step against wall time, and the host ops
    that cost most; then the weights-read floor (every weight read once per token at the measured copy rate)."""
    steps = args.image_seq_length + 3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.inference_mode():
        for _ in range(2):  # compile, then the warm cudagraph path
            model.generate(prompt, generation_mode="image", cache_implementation="static")
        synchronize(args.device)
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as profile:
            model.generate(prompt, generation_mode="image", cache_implementation="static")
            synchronize(args.device)
        wall = time.perf_counter() - start
    events = profile.key_averages()
    busy = sum(event.self_device_time_total for event in events) / 1e6
    print(f"# bench_generate --breakdown  {datetime.date.today()}  {machine(args)}")
    print(f"image, static cache, under the profiler: {1000 * wall / steps:.2f} ms wall per step, "
          f"{1000 * busy / steps:.2f} ms of it with the device busy ({100 * busy / wall:.0f}%)")
    print("host ops by self CPU time (us per step):")
    for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:15]:
        print(f"  {event.key[:70]:70s} {event.self_cpu_time_total / steps:8.1f}  x{event.count / steps:.1f}")
    weight_bytes = sum(  # every matrix a step reads: the input embedding is only indexed, a tied lm_head is read
        p.numel() * p.element_size() for name, p in model.named_parameters(remove_duplicate=False) if "embed" not in name
    )
    block = torch.empty(1 << 31, dtype=torch.uint8, device=args.device)
    copy_seconds = median_seconds(lambda: block.clone(), args.device, 10)
    rate = 2 * block.numel() / copy_seconds  # bytes read + written per second
    print(f"weights read per token: {weight_bytes / 1e9:.2f} GB; device copy rate {rate / 1e12:.2f} TB/s "
          f"(read + write) -> floor {1000 * weight_bytes / rate:.2f} ms per token, {steps * weight_bytes / rate:.2f} s "
          "per image")


def machine(args) -> str:
    if args.device.startswith("cuda"):
        accelerator = torch.cuda.get_device_name(torch.device(args.device))
    else:
        accelerator = f"CPU, {torch.get_num_threads()} torch threads"
    return f"{platform.machine()} {platform.processor() or platform.system()}, {accelerator}, torch {torch.__version__}"


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.processors_only:
        return compare_processors(args)
    model = build_model(args)
    prompt = torch.randint(0, args.text_vocab, (args.batch, args.prompt_length), device=args.device)
    prompt[:, 0] = model.config.bos_token_id
    if args.breakdown:
        return step_breakdown(model, prompt, args)
    parameters = sum(p.numel() for p in model.parameters())
    times = generation_times(model, prompt, args)
    steps = args.image_seq_length + 3
    print(f"# bench_generate  {datetime.date.today()}  {machine(args)}")
    print(f"model: {parameters / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers), {args.dtype}; "
          f"vocab {model.config.vocab_size}; image = {args.image_seq_length} tokens; batch {args.batch}; "
          f"prompt {args.prompt_length} tokens; median of {args.runs}")
    print("| generation | s / image | ms / token | vs plain decode |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        plain = times[f"plain decode, {name.split(', ')[-1]}"]
        print(f"| {name} | {seconds:.3f} | {1000 * seconds / steps:.2f} | {seconds / plain:.2f}x |")
    for cache_name in ("dynamic", "static"):
        if f"image, {cache_name}" in times:
            ratio = times[f"image + CFG, {cache_name}"] / times[f"image, {cache_name}"]
            print(f"CFG cost, {cache_name} cache: {ratio:.2f}x the unguided image (target <= 2.1x)")
    if "image, static" in times:
        print(f"static / dynamic cache, image: {times['image, static'] / times['image, dynamic']:.2f}x; "
              f"with CFG: {times['image + CFG, static'] / times['image + CFG, dynamic']:.2f}x")
    for guided, name in ((False, "image"), (True, "image + CFG")):
        per_call = processor_seconds_per_step(model.vocabulary, args, guided)
        step = min(times[key] for key in times if key.startswith(f"{name},")) / steps
        print(f"processors, {name}: {1e6 * per_call:.0f} us per step = {100 * per_call / step:.1f}% of a step "
              f"({1000 * step:.2f} ms, fastest cache) (target <= 3%)")


if __name__ == "__main__":
    main()
