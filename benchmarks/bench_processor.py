"""Documents/s from documents to ids: our processor vs transformers' ChameleonProcessor + get_image_tokens.

    python benchmarks/bench_processor.py
    python benchmarks/bench_processor.py --resolution 256 --documents 32

Both sides start from the same PIL images (one per document, 300x200 RGB) and the same text, share one
tokenizer, and encode with the same VQ weights and sizes (transformers' ChameleonVQVAE copied into ours).
Theirs: processor(...) -> placeholder ids + pixel_values, then ChameleonModel.get_image_tokens and the
placeholders replaced by the image token ids. Ours: processor(...) does all of it.
"""

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import ChameleonConfig, ChameleonModel, ChameleonProcessor
from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

from chameleon_fusion import ChameleonFusionImageProcessor, ChameleonFusionProcessor, train_bpe_tokenizer
from chameleon_fusion.convert.checkpoint import chameleon_image_token_name
from chameleon_fusion.convert.vqgan import load_transformers_chameleon_vqvae


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--channel-multiplier", type=int, nargs="+", default=[1, 1, 2, 2])
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def build(args):
    """Both processors over one tokenizer and one set of VQ weights."""
    tokenizer = train_bpe_tokenizer(
        ["a photo of a sneaker next to an ankle boot", "the quick brown fox jumps over the lazy dog"] * 50,
        vocab_size=400, min_frequency=1, show_progress=False,
        special_tokens={"boi_token": "<racm3:break>", "eoi_token": "<eoss>"},
    )
    codebook_offset = len(tokenizer)
    image_names = {chameleon_image_token_name(k): codebook_offset + k for k in range(args.codebook)}
    vq_config = dict(resolution=args.resolution, base_channels=args.base_channels, embed_dim=64, latent_channels=64,
                     channel_multiplier=args.channel_multiplier, num_embeddings=args.codebook)
    torch.manual_seed(0)
    their_model = ChameleonModel(ChameleonConfig(
        vocab_size=codebook_offset + args.codebook, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, vq_config=vq_config, vocabulary_map={"<image>": tokenizer.convert_tokens_to_ids("<image>"),
                                                                    **image_names}),
    ).eval()
    ours_vq = load_transformers_chameleon_vqvae(their_model.vqmodel)
    latent = ours_vq.config.latent_size
    theirs = ChameleonProcessor(
        ChameleonImageProcessorPil(size={"shortest_edge": args.resolution},
                                   crop_size={"height": args.resolution, "width": args.resolution}),
        tokenizer, image_seq_length=latent * latent,
    )
    ours = ChameleonFusionProcessor(
        ChameleonFusionImageProcessor(size=args.resolution, resample="lanczos"), tokenizer, vq_model=ours_vq,
        boi_token="<racm3:break>", eoi_token="<eoss>",
    )
    return ours, theirs, their_model


def documents(count):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)) for _ in range(count)]
    texts = [f"document {i}: a photo of <image> next to an ankle boot" for i in range(count)]
    return texts, images


@torch.inference_mode()
def theirs_to_ids(processor, model, texts, images):
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt", return_for_text_completion=True)
    image_tokens = model.get_image_tokens(inputs["pixel_values"])
    ids = inputs["input_ids"]
    ids[ids == processor.image_token_id] = image_tokens.flatten().to(ids.dtype)
    return ids


def ours_to_ids(processor, texts, images):
    return processor(text=texts, images=images, padding=True, return_tensors="pt")["input_ids"]


def documents_per_second(fn, count, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def main():
    args = parse_args()
    ours, theirs, their_model = build(args)
    texts, images = documents(args.documents)
    ours_ids = ours_to_ids(ours, texts, images)
    their_ids = theirs_to_ids(theirs, their_model, texts, images)
    if ours_ids.shape[1] == their_ids.shape[1] + 1:
        ours_ids = ours_ids[:, 1:]  # their tokenizer call adds no bos here
    agreement = (ours_ids == their_ids).float().mean().item() if ours_ids.shape == their_ids.shape else float("nan")
    ours_rate = documents_per_second(lambda: ours_to_ids(ours, texts, images), args.documents, args.repeats)
    their_rate = documents_per_second(lambda: theirs_to_ids(theirs, their_model, texts, images), args.documents,
                                      args.repeats)
    latent = ours.vq_model.config.latent_size
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"VQ: {args.resolution} px -> {latent}x{latent} codes of {args.codebook}; {args.documents} documents "
          f"of one 300x200 image + text")
    print(f"ids agree on {agreement:.1%} of positions (pixel scaling differs: theirs x*0.0078-1, ours x/127.5-1)")
    print(f"ours:         {ours_rate:8.1f} documents/s")
    print(f"transformers: {their_rate:8.1f} documents/s (ChameleonProcessor + ChameleonModel.get_image_tokens)")
    print(f"ratio ours/transformers: {ours_rate / their_rate:.2f}x")


if __name__ == "__main__":
    main()
