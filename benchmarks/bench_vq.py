"""Image tokenizer speed: encode images/s of ours vs transformers' ChameleonVQVAE (same config, same
weights, same process), and decode images/s of ours (transformers has no decoder); then the trained
Fashion-MNIST tokenizer's quality on the 10k test images.

    .venv/bin/python benchmarks/bench_vq.py [--tokenizer runs/vq-fashion]

Two cases: the trained Fashion-MNIST tokenizer (32 px, 8x8 codes), and Chameleon's own architecture at
128 px with random weights. Runs are interleaved and the best of several repeats is kept, which makes
the ratio robust to other work on a shared machine.
"""

import argparse
import datetime
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

from chameleon_fusion.configuration_chameleon_fusion import ChameleonFusionVQVAEConfig
from chameleon_fusion.fashion_mnist import load_fashion_mnist
from chameleon_fusion.modeling_vqvae import ChameleonFusionVQVAE
from chameleon_fusion.training.vq import evaluate_tokenizer, fashion_mnist_uint8, to_pixel_values


def transformers_twin(ours: ChameleonFusionVQVAE) -> ChameleonVQVAE:
    """transformers' ChameleonVQVAE with our config and our encoder-side weights."""
    c = ours.config
    if c.norm_num_groups != 32 or c.quantizer == "fsq" or (c.attn_resolutions and not c.mid_attention):
        raise ValueError("transformers' ChameleonVQVAE cannot express this config")
    config = ChameleonVQVAEConfig(
        resolution=c.resolution, in_channels=c.in_channels, base_channels=c.base_channels,
        channel_multiplier=list(c.channel_multiplier), num_res_blocks=c.num_res_blocks,
        attn_resolutions=list(c.attn_resolutions), attn_type="vanilla" if c.mid_attention else "none",
        latent_channels=c.latent_channels, embed_dim=c.embed_dim, num_embeddings=c.codebook_size,
    )
    twin = ChameleonVQVAE(config).eval()
    ours_state = ours.state_dict()
    twin.load_state_dict({key: ours_state[key] for key in twin.state_dict()})
    return twin


def images_per_second(fn, pixels: torch.Tensor, seconds: float) -> float:
    """Best rate over repeated calls within a time budget (after one warm-up call)."""
    fn(pixels)
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        fn(pixels)
        elapsed = time.perf_counter() - start
        best, spent = max(best, len(pixels) / elapsed), spent + elapsed
    return best


def compare(name: str, ours: ChameleonFusionVQVAE, batch: int, rounds: int, seconds: float):
    ours.eval()
    twin = transformers_twin(ours)
    side = ours.config.resolution
    pixels = torch.rand(batch, ours.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    pixels = pixels * 2 - 1
    with torch.inference_mode():
        codes = ours.encode(pixels)
        same = (codes.flatten() == twin.encode(pixels).image_tokens).float().mean().item()
        ours_rates, twin_rates, decode_rates = [], [], []
        for _ in range(rounds):  # interleaved, so both see the same machine load
            ours_rates.append(images_per_second(ours.encode, pixels, seconds))
            twin_rates.append(images_per_second(lambda x: twin.encode(x).image_tokens, pixels, seconds))
            decode_rates.append(images_per_second(ours.decode, codes, seconds))
    ours_rate, twin_rate = max(ours_rates), max(twin_rates)
    print(f"| {name} | {batch} | {ours_rate:,.1f} | {twin_rate:,.1f} | **{ours_rate / twin_rate:.2f}x** | "
          f"{max(decode_rates):,.1f} | {same:.4f} |", flush=True)


@torch.inference_mode()
def quality(model: ChameleonFusionVQVAE):
    """Round-trip quality on the 10k Fashion-MNIST test images, at 32 px and back at the native 28 px."""
    images28, _ = load_fashion_mnist("test")
    images = fashion_mnist_uint8("test", model.config.resolution)
    metrics = evaluate_tokenizer(model, images)
    print("quality on the 10k test images (32 px, vs the bicubic-resized input): " + ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))

    def back_to_28(gray):  # float (N, 32, 32) in [0, 255] -> (N, 28, 28), PIL bicubic
        return np.stack([np.asarray(Image.fromarray(g).resize((28, 28), Image.BICUBIC)) for g in gray])

    decoded = []
    for start in range(0, len(images), 500):
        pixels = to_pixel_values(images[start : start + 500], model.config.in_channels)
        decoded.append(model.decode(model.encode(pixels)).mean(1))  # the channels are one gray image
    decoded = ((torch.cat(decoded) + 1) * 127.5).numpy().astype(np.float32)
    resized_only = images[:, 0].numpy().astype(np.float32)

    def mean_psnr(estimate):
        mse = ((estimate.clip(0, 255) - images28.astype(np.float32)) ** 2).reshape(len(estimate), -1).mean(1)
        return float(np.mean(10 * np.log10(255**2 / np.maximum(mse, 1e-10))))

    print(f"native 28 px PSNR (decode, bicubic back to 28): {mean_psnr(back_to_28(decoded)):.2f} dB; "
          f"ceiling of the 28->32->28 resize alone: {mean_psnr(back_to_28(resized_only)):.2f} dB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="runs/vq-fashion", help="a saved ChameleonFusionVQVAE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    parser.add_argument("--skip-quality", action="store_true", help="speed only, no test-set round trip")
    args = parser.parse_args()
    torch.manual_seed(0)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; date: {datetime.date.today()}")
    print("| case | batch | ours encode img/s | transformers encode img/s | ratio | ours decode img/s "
          "| same codes |")
    print("|---|---|---|---|---|---|---|")
    fashion = None
    if Path(args.tokenizer).exists():
        fashion = ChameleonFusionVQVAE.from_pretrained(args.tokenizer)
        compare(f"Fashion-MNIST tokenizer ({args.tokenizer}), 32 px", fashion, 256, args.rounds, args.seconds)
    else:
        print(f"(no tokenizer at {args.tokenizer}: train one with `chameleon-fusion train-vq --fashion-mnist`)")
    chameleon_arch = ChameleonFusionVQVAE(ChameleonFusionVQVAEConfig(resolution=128))  # Chameleon's sizes
    compare("Chameleon architecture, random weights, 128 px", chameleon_arch, 4, args.rounds, args.seconds)
    if fashion is not None and not args.skip_quality:
        quality(fashion.eval())


if __name__ == "__main__":
    main()
