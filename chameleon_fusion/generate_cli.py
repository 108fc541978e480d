"""Generate text, an image, or an interleaved document from a prompt with a saved model and processor.

Example: chameleon-fusion generate --model DIR --prompt "a red circle" --mode image --out out/ .
Writes output.txt (text mode), image_<n>.png (image mode) or index.html with its PNGs (interleaved mode)
into --out; a progress bar counts the generated tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from .document_html import write_document_html
from .generation import GENERATION_MODES

# command-line flag -> generate() keyword
SAMPLING_FLAGS = {
    "temperature": "text_temperature",
    "top_k": "text_top_k",
    "top_p": "text_top_p",
    "image_temperature": "image_temperature",
    "image_top_k": "image_top_k",
    "image_top_p": "image_top_p",
    "max_images": "max_images",
    "guidance_scale": "text_guidance_scale",
    "image_guidance_scale": "image_guidance_scale",
}


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="folder with the model and its processor (save_pretrained)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--mode", choices=GENERATION_MODES, default="text")
    parser.add_argument("--out", default="generate_output", help="folder for the outputs")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: one image in image mode, else 20")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--temperature", type=float, default=None, help="text tokens (0 = greedy, the default)")
    parser.add_argument("--top-k", type=int, default=None, help="text tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=None, help="text tokens (1 = off)")
    parser.add_argument("--image-temperature", type=float, default=None, help="image tokens (default 1)")
    parser.add_argument("--image-top-k", type=int, default=None, help="image tokens (0 = off)")
    parser.add_argument("--image-top-p", type=float, default=None, help="image tokens (1 = off)")
    parser.add_argument("--max-images", type=int, default=None, help="interleaved mode: images per document")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance of image tokens by the prompt (e.g. 3)")
    parser.add_argument("--image-guidance-scale", type=float, default=None,
                        help="with --guidance-scale: Chameleon's 3-way guidance by the prompt's images")


class TokenProgress(BaseStreamer):
    """A tqdm bar that advances by one for every step generate() takes (the first put is the prompt)."""

    def __init__(self, total: int | None):
        self.bar, self.seen_prompt = tqdm(total=total, unit="tok", desc="generating"), False

    def put(self, value):
        if self.seen_prompt:
            self.bar.update(1)
        self.seen_prompt = True

    def end(self):
        self.bar.close()


def run(args):
    from .modeling_chameleon_fusion import ChameleonFusionForConditionalGeneration
    from .processing_chameleon_fusion import ChameleonFusionProcessor

    if args.seed is not None:
        torch.manual_seed(args.seed)
    processor = ChameleonFusionProcessor.from_pretrained(args.model).to(args.device)
    model = ChameleonFusionForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    processor.check_model(model)
    inputs = processor(text=args.prompt, return_tensors="pt", padding=True, padding_side="left").to(args.device)
    kwargs = {keyword: getattr(args, flag) for flag, keyword in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    total = args.max_new_tokens or (model.vocabulary.image_seq_length + 3 if args.mode == "image" else None)
    with torch.inference_mode():
        output = model.generate(**inputs, generation_mode=args.mode, streamer=TokenProgress(total), **kwargs)
    generated = output[:, inputs["input_ids"].shape[1] :].cpu()
    results = processor.post_process_multimodal_output(generated, generation_mode=args.mode)
    return write_results(results, args.mode, args.prompt, Path(args.out))


def write_results(results, mode: str, prompts: list[str], out: Path) -> int:
    """Save what generate produced: texts, PNGs, or the interleaved page; print where it went."""
    out.mkdir(parents=True, exist_ok=True)
    if mode == "text":
        (out / "output.txt").write_text("\n".join(results) + "\n", encoding="utf-8")
        for prompt, text in zip(prompts, results):
            print(f"{prompt!r} -> {text!r}")
        print(f"wrote {out / 'output.txt'}")
    elif mode == "image":
        for number, image in enumerate(results):
            if image is None:
                print(f"prompt {number}: no complete image was generated")
                continue
            image.save(out / f"image_{number}.png")
            print(f"wrote {out / f'image_{number}.png'}")
    else:
        documents = [[f"Prompt: {prompt}", *parts] for prompt, parts in zip(prompts, results)]
        print(f"wrote {write_document_html(documents, out, title='chameleon-fusion generate')}")
    return 0
