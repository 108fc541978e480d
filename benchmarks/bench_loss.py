"""The training loss, forward + backward: our early_fusion_loss vs transformers' ForCausalLMLoss (what its Chameleon
uses), on the same logits and labels.

    python benchmarks/bench_loss.py                          # bench_model's default shape: 4 x 256 x 16198
    python benchmarks/bench_loss.py --batch 8 --seq 1024 --text-vocab 65536

Ours also returns text_loss, image_loss and z_loss (log Z = cross-entropy + the label's logit, no second pass over
the vocabulary); "z coefficient 1e-5" adds the z-loss term to the gradient. Calls are interleaved, medians.
"""

import argparse
import platform
import statistics
import time

import torch
from common import contiguous_layout
from transformers.loss.loss_utils import ForCausalLMLoss

from chameleon_fusion import ChameleonFusionConfig, Vocabulary
from chameleon_fusion.modeling_chameleon_fusion import early_fusion_loss


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--text-vocab", type=int, default=8000)
    parser.add_argument("--codebook", type=int, default=8192)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


def timer(loss_fn, logits: torch.Tensor):
    """A function that runs loss_fn forward + backward on a fresh leaf copy of logits and returns its seconds."""

    def run() -> float:
        leaf = logits.clone().requires_grad_()
        start = time.perf_counter()
        loss_fn(leaf).backward()
        return time.perf_counter() - start

    return run


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ChameleonFusionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   **contiguous_layout(args.text_vocab, args.codebook))
    vocabulary = Vocabulary.from_config(config)
    torch.manual_seed(0)
    logits = torch.randn(args.batch, args.seq, vocabulary.vocab_size)
    labels = torch.randint(0, vocabulary.vocab_size, (args.batch, args.seq))
    labels[:, :8] = -100
    timers = {
        "transformers ForCausalLMLoss": timer(lambda x: ForCausalLMLoss(x, labels, vocabulary.vocab_size), logits),
        "ours, z coefficient 0": timer(lambda x: early_fusion_loss(x, labels, vocabulary)["loss"], logits),
        "ours, z coefficient 1e-5": timer(
            lambda x: early_fusion_loss(x, labels, vocabulary, z_loss_coefficient=1e-5)["loss"], logits
        ),
    }
    times = {name: [] for name in timers}
    for round_ in range(args.runs + 1):  # round 0 warms up
        for name, run in timers.items():
            seconds = run()
            if round_:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["transformers ForCausalLMLoss"]
    print(f"# bench_loss  {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"logits {args.batch} x {args.seq} x {vocabulary.vocab_size} float32; forward + backward; median of {args.runs}")
    print("| loss | ms | vs transformers |\n|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {1000 * seconds:.1f} | {reference / seconds:.2f}x |")


if __name__ == "__main__":
    main()
