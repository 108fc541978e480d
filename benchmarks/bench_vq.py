"""Image tokenizer speed: encode images/s of ours vs transformers' ChameleonVQVAE (same config, same
weights, same process), and decode images/s of ours (transformers has no decoder); then the trained
Fashion-MNIST tokenizer's quality on the 10k test images.

    .venv/bin/python benchmarks/bench_vq.py [--tokenizer runs/vq-fashion]

Two cases: the trained Fashion-MNIST tokenizer (32 px, 8x8 codes), and Chameleon's own architecture at
128 px with random weights. The two encoders are called alternately and the ratio is the median of the
paired time ratios, which keeps it steady on a machine shared with other work.
"""

import argparse
import datetime
import platform
import statistics
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


def seconds(fn, inputs) -> float:
    start = time.perf_counter()
    fn(inputs)
    return time.perf_counter() - start


def compare(name: str, ours: ChameleonFusionVQVAE, batch: int, calls: int):
    """Ours and transformers' encode called alternately `calls` times: the ratio is the median of the paired
    time ratios, which a shared machine's changing load shifts far less than separate best-of timings."""
    ours.eval()
    twin = transformers_twin(ours)
    side = ours.config.resolution
    pixels = torch.rand(batch, ours.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    pixels = pixels * 2 - 1

    def twin_encode(x):
        return twin.encode(x).image_tokens

    with torch.inference_mode():
        codes = ours.encode(pixels)
        same = (codes.flatten() == twin_encode(pixels)).float().mean().item()
        ours.decode(codes)  # warm-up
        ours_times, twin_times, decode_times = [], [], []
        for _ in range(calls):
            ours_times.append(seconds(ours.encode, pixels))
            twin_times.append(seconds(twin_encode, pixels))
            decode_times.append(seconds(ours.decode, codes))
    ratio = statistics.median(t / o for o, t in zip(ours_times, twin_times))
    rate = {key: batch / statistics.median(times) for key, times in
            (("ours", ours_times), ("twin", twin_times), ("decode", decode_times))}
    print(f"| {name} | {batch} | {rate['ours']:,.1f} | {rate['twin']:,.1f} | **{ratio:.2f}x** | "
          f"{rate['decode']:,.1f} | {same:.4f} |", flush=True)


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
    parser.add_argument("--calls", type=int, default=15, help="timed calls of each model per case")
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
        compare(f"Fashion-MNIST tokenizer ({args.tokenizer}), 32 px", fashion, 256, args.calls)
    else:
        print(f"(no tokenizer at {args.tokenizer}: train one with `chameleon-fusion train-vq --fashion-mnist`)")
    chameleon_arch = ChameleonFusionVQVAE(ChameleonFusionVQVAEConfig(resolution=128))  # Chameleon's sizes
    compare("Chameleon architecture, random weights, 128 px", chameleon_arch, 4, args.calls)
    if fashion is not None and not args.skip_quality:
        quality(fashion.eval())


if __name__ == "__main__":
    main()
