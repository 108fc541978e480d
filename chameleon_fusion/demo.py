"""Run the demo: the bundled Fashion-MNIST model captions real images, draws every class, writes a two-item page.

Writes demo_output/index.html (and its PNGs) to open in a browser; prints where it is.
"""

import time
from pathlib import Path

import torch
from PIL import Image

from .document_html import write_document_html
from .fashion.documents import CLASS_NAMES, caption_prompt, two_items_opening
from .fashion_mnist import load_fashion_mnist


def add_arguments(parser):
    parser.add_argument("--model", default=None, help="a recipe output folder (default: the bundled model)")
    parser.add_argument("--out", default="demo_output", help="where to write index.html and its images")
    parser.add_argument("--captions", type=int, default=6, help="real test images to caption")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance when drawing")
    parser.add_argument("--seed", type=int, default=0)


def run(args):
    from .fashion.bundle import load_bundle, read_metrics

    started = time.time()
    torch.manual_seed(args.seed)
    model, processor, judge, folder = load_bundle(args.model)
    print(f"loaded {folder} ({model.num_parameters() / 1e6:.1f}M-parameter decoder, "
          f"{processor.vocabulary.image_seq_length} tokens per image)")
    documents = captions(model, processor, args.captions) + drawings(model, processor, judge, args.guidance_scale)
    documents.append(two_item_page(model, processor, args.guidance_scale))
    page = write_document_html(documents, Path(args.out), title="chameleon-fusion demo: the bundled Fashion-MNIST model")
    metrics = read_metrics(args.model)
    if metrics:
        print("evaluation of this model (chameleon-fusion eval): " + ", ".join(
            f"{name} {metrics[name]:.1%}" for name in ("caption_accuracy", "text_to_image_accuracy", "two_item_accuracy")
            if name in metrics))
    print(f"demo written in {time.time() - started:.0f} s: open {page.resolve()}")
    return 0


def _generate(model, processor, documents, **settings):
    batch = processor(documents=documents, padding=True, padding_side="left", return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**batch, **settings)
    return processor.post_process_multimodal_output(ids[:, batch["input_ids"].shape[1] :], generation_mode="interleaved")


def captions(model, processor, count: int) -> list[list]:
    """Image -> text on real test images: each document is the image, the model's caption and the truth."""
    images, labels = load_fashion_mnist("test")
    pictures = [Image.fromarray(image) for image in images[:count]]
    answers = _generate(model, processor, [[picture] for picture in pictures], generation_mode="text",
                        max_new_tokens=12, do_sample=False)
    return [[picture, "".join(p for p in answer if isinstance(p, str)).strip() + f"   (truth: {CLASS_NAMES[label]})"]
            for picture, answer, label in zip(pictures, answers, labels)]


def drawings(model, processor, judge, guidance_scale: float) -> list[list]:
    """Text -> image, one per class, with what the judge (trained on real images) sees in each."""
    prompts = [caption_prompt(label) for label in range(len(CLASS_NAMES))]
    pages = _generate(model, processor, [[prompt] for prompt in prompts], generation_mode="image",
                      text_guidance_scale=guidance_scale)
    drawn = [next((p for p in page if isinstance(p, Image.Image)), None) for page in pages]
    verdicts = judge.predict([image for image in drawn if image is not None])
    verdicts = iter(verdicts)
    return [[prompt, image, f"(the judge sees: {CLASS_NAMES[next(verdicts)]})"] if image is not None else [prompt]
            for prompt, image in zip(prompts, drawn)]


def two_item_page(model, processor, guidance_scale: float) -> list:
    """An interleaved document: the model continues 'Here is a bag:' with an image, its own text, another image."""
    prompt = two_items_opening(CLASS_NAMES.index("bag"))
    page = _generate(model, processor, [[prompt]], generation_mode="interleaved", max_images=2,
                     text_guidance_scale=guidance_scale,
                     max_new_tokens=2 * (processor.vocabulary.image_seq_length + 2) + 24)[0]
    return [prompt, *page]
