"""Evaluate an early-fusion Fashion-MNIST model: tokenizer fidelity, captions, drawing, two-item pages, openings."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..fashion_mnist import load_fashion_mnist
from .documents import CLASS_NAMES, caption_prompt, parse_caption, two_items_opening

TARGETS = {"text_to_image_accuracy": 0.90, "caption_accuracy": 0.85, "vq_psnr_db": 24.0,
           "vq_utilization": 0.90, "two_item_accuracy": 0.80}
GUIDANCE = 3.0


def add_arguments(parser):
    parser.add_argument("--model", default=None, help="a recipe output folder (default: the bundled model)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many test images / prompts per test")
    parser.add_argument("--per-class", type=int, default=50,
                        help="drawings per class for text->image, and two-item pages per class")
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE, help="classifier-free guidance when drawing")
    parser.add_argument("--openings", type=int, default=200, help="free generations counted for the opening split")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the figures as JSON here (default: print only)")


def run(args):
    from .bundle import load_bundle

    model, processor, judge, folder = load_bundle(args.model)
    metrics = evaluate(model, processor, judge, limit=args.limit, per_class=args.per_class,
                       guidance_scale=args.guidance_scale, openings=args.openings, batch_size=args.batch_size,
                       seed=args.seed)
    print(format_metrics(metrics, folder))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def evaluate(model, processor, judge, limit=None, per_class=50, guidance_scale=GUIDANCE, openings=200,
             batch_size=100, seed=0, root=None) -> dict:
    """Every figure of the Fashion-MNIST evaluation, on the real test split."""
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist("test", root)
    images, labels = images[:limit], labels[:limit]
    pictures = [Image.fromarray(image) for image in images]
    metrics = {"test_images": len(pictures)}
    metrics.update(tokenizer_fidelity(processor, pictures))
    metrics["judge_accuracy_on_real_test_images"] = float((judge.predict(pictures) == labels).mean())
    metrics["caption_accuracy"] = caption_accuracy(model, processor, pictures, labels, batch_size)
    per_class = min(per_class, limit) if limit else per_class
    metrics["text_to_image_accuracy"] = text_to_image_accuracy(model, processor, judge, per_class, guidance_scale,
                                                               batch_size)
    metrics["two_item_accuracy"] = two_item_accuracy(model, processor, judge, per_class, guidance_scale, batch_size)
    metrics["samples"] = {"caption_accuracy": len(pictures), "text_to_image_accuracy": 10 * per_class,
                          "two_item_accuracy": 10 * per_class}
    metrics.update(opening_split(model, processor, openings, batch_size))
    metrics["guidance_scale"] = guidance_scale
    metrics["targets"] = TARGETS
    return metrics


def tokenizer_fidelity(processor, pictures) -> dict:
    """PSNR, codebook utilization and perplexity of the VQ round trip on the processor's own pixels."""
    from ..training.vq import evaluate_tokenizer

    pixels = processor.image_processor(pictures)["pixel_values"]
    uint8 = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    found = evaluate_tokenizer(processor.vq_model, uint8)
    return {"vq_psnr_db": found["psnr_db"], "vq_utilization": found["utilization"],
            "vq_perplexity": found["perplexity"], "vq_reencode_same_code_rate": found["reencode_same_code_rate"]}


def _generate(model, processor, documents, batch_size, description, **settings) -> list:
    """Generate for every document, batch by batch (left padding), and return the interleaved outputs."""
    outputs = []
    for start in tqdm(range(0, len(documents), batch_size), desc=description, unit="batch"):
        batch = processor(documents=documents[start : start + batch_size], padding=True, padding_side="left",
                          return_tensors="pt").to(model.device)
        with torch.inference_mode():
            ids = model.generate(**batch, **settings)
        new_ids = ids[:, batch["input_ids"].shape[1] :]
        outputs += processor.post_process_multimodal_output(new_ids, generation_mode="interleaved")
    return outputs


def caption_accuracy(model, processor, pictures, labels, batch_size) -> float:
    """Image -> text: the share of real test images whose generated caption names their class."""
    answers = _generate(model, processor, [[picture] for picture in pictures], batch_size, "captions",
                        generation_mode="text", max_new_tokens=12, do_sample=False)
    named = [parse_caption("".join(p for p in answer if isinstance(p, str))) for answer in answers]
    return float(np.mean([name == label for name, label in zip(named, labels)]))


def draw(model, processor, texts, batch_size, guidance_scale, description="drawing") -> list:
    """One image per prompt text (None where none came out)."""
    outputs = _generate(model, processor, [[text] for text in texts], batch_size, description,
                        generation_mode="image", text_guidance_scale=guidance_scale)
    return [next((p for p in output if isinstance(p, Image.Image)), None) for output in outputs]


def text_to_image_accuracy(model, processor, judge, per_class, guidance_scale, batch_size) -> float:
    """Text -> image: the share of drawings the judge (trained on real images only) puts in the asked class."""
    asked = [label for label in range(len(CLASS_NAMES)) for _ in range(per_class)]
    drawn = draw(model, processor, [caption_prompt(label) for label in asked], batch_size, guidance_scale)
    return _judged_share(judge, drawn, asked)


def _judged_share(judge, drawn, asked) -> float:
    kept = [(image, label) for image, label in zip(drawn, asked) if image is not None]
    if not kept:
        return 0.0
    verdicts = judge.predict([image for image, _ in kept])
    return float(sum(v == label for v, (_, label) in zip(verdicts, kept)) / len(asked))


def two_item_accuracy(model, processor, judge, per_class, guidance_scale, batch_size) -> float:
    """'Here is a bag:' -> image, the model's own ' and next to it X:' -> image; both must be judged right."""
    asked = [label for label in range(len(CLASS_NAMES)) for _ in range(per_class)]
    pages = _generate(model, processor, [[two_items_opening(label)] for label in asked], batch_size, "two-item pages",
                      generation_mode="interleaved", max_images=2, text_guidance_scale=guidance_scale,
                      max_new_tokens=2 * (processor.vocabulary.image_seq_length + 2) + 24)
    right = 0
    for label, page in zip(asked, pages):
        kinds = ["image" if isinstance(p, Image.Image) else "text" for p in page]
        if kinds[:3] != ["image", "text", "image"]:
            continue
        second = parse_caption(page[1].replace("and next to it", "").strip())
        first_verdict, second_verdict = judge.predict([page[0], page[2]])
        right += int(first_verdict == label and second is not None and second_verdict == second)
    return right / len(asked)


def opening_split(model, processor, count, batch_size) -> dict:
    """Free interleaved generation from bos alone: how often the model opens with an image rather than text."""
    if count == 0:
        return {}
    boi = processor.vocabulary.boi_token_id
    bos = processor(text="", return_tensors="pt")["input_ids"].to(model.device)
    first_tokens = []
    for start in range(0, count, batch_size):
        rows = min(batch_size, count - start)
        with torch.inference_mode():
            ids = model.generate(bos.expand(rows, -1), generation_mode="interleaved", do_sample=True,
                                 text_temperature=1.0, max_new_tokens=processor.vocabulary.image_seq_length + 3)
        first_tokens += ids[:, 1].tolist()
    images_first = sum(token == boi for token in first_tokens)
    return {"opening_image_first": images_first / count, "opening_text_first": (count - images_first) / count,
            "openings_sampled": count, "training_text_first_share": 0.6}


def _interval(share: float, metrics: dict, name: str) -> str:
    """' ± h of n' with h the half-width of a 95% normal interval for a share measured on n samples."""
    count = metrics.get("samples", {}).get(name)
    return f" ± {1.96 * (share * (1 - share) / count) ** 0.5:.1%} of {count}" if count else ""


def format_metrics(metrics: dict, folder) -> str:
    lines = [f"evaluation of {folder} on {metrics['test_images']} real Fashion-MNIST test images"]
    for name, target in TARGETS.items():
        value = metrics.get(name)
        if value is None:
            continue
        shown = f"{value:.2f} dB" if name.endswith("_db") else f"{value:.1%}" + _interval(value, metrics, name)
        wanted = f"{target:.0f} dB" if name.endswith("_db") else f"{target:.0%}"
        verdict = "met" if value >= target else "NOT met"
        lines.append(f"  {name:<24} {shown:>21}   (target >= {wanted}: {verdict})")
    lines.append(f"  judge on real test images {metrics['judge_accuracy_on_real_test_images']:>8.1%}")
    lines.append(f"  VQ perplexity {metrics['vq_perplexity']:.1f}, re-encode same code "
                 f"{metrics['vq_reencode_same_code_rate']:.1%}")
    if "opening_image_first" in metrics:
        lines.append(f"  free generation opens with an image {metrics['opening_image_first']:.1%} / text "
                     f"{metrics['opening_text_first']:.1%} of {metrics['openings_sampled']} samples "
                     f"(training documents: 60% text-first / 40% image-first)")
    return "\n".join(lines)
