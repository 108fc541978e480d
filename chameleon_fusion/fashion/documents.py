"""Fashion-MNIST as early-fusion documents: captions before images, captions after images, two-item pages."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..fashion_mnist import load_fashion_mnist

# the word each class is called by in the documents (unique phrases, so a caption parses back to one class)
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
KINDS = ("caption_first", "image_first", "two_items")


def with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption_prompt(label: int) -> str:
    """The text a caption-first document opens with; also the prompt that asks the model to draw."""
    return f"a photo of {with_article(CLASS_NAMES[label])}:"


def caption_answer(label: int) -> str:
    """The text that follows an image in an image-first document; also what captioning should produce."""
    return f" this is {with_article(CLASS_NAMES[label])}."


def two_items_opening(label: int) -> str:
    return f"Here is {with_article(CLASS_NAMES[label])}:"


def two_items_middle(label: int) -> str:
    return f" and next to it {with_article(CLASS_NAMES[label])}:"


def parse_caption(text: str) -> int | None:
    """The class a generated caption names (' this is a sneaker.' -> 7), or None when it names none."""
    words = text.strip().lower().removeprefix("this is").strip().removeprefix("an ").removeprefix("a ")
    name = words.split(".")[0].split(":")[0].strip()
    return CLASS_NAMES.index(name) if name in CLASS_NAMES else None


def training_texts() -> list[str]:
    """Every text the documents can contain, for training the BPE tokenizer."""
    texts = []
    for label in range(len(CLASS_NAMES)):
        texts += [caption_prompt(label), caption_answer(label), two_items_opening(label), two_items_middle(label)]
    return texts


def draw_kinds(
    count: int, text_first_share: float, rng: np.random.Generator, two_item_share: float = 1 / 3
) -> list[str]:
    """Document kinds with `text_first_share` opening with text and the rest opening with an image (image-first);
    `two_item_share` of the text-first ones are two-item pages, the others caption-first."""
    for name, share in (("text_first_share", text_first_share), ("two_item_share", two_item_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {share!r}")
    kinds = []
    for _ in range(count):
        if rng.random() >= text_first_share:
            kinds.append("image_first")
        else:
            kinds.append("two_items" if rng.random() < two_item_share else "caption_first")
    return kinds


def write_documents(folder, split: str = "train", count: int = 30000, text_first_share: float = 0.6,
                    seed: int = 0, root=None, limit_images: int | None = None, two_item_share: float = 1 / 3) -> Path:
    """Write `count` documents over the split's real images as PNGs plus documents.jsonl; returns the JSONL path.

    Caption-first documents are prompt/answer pairs (caption -> image), so training can drop the prompt for
    classifier-free guidance.
    """
    images, labels = load_fashion_mnist(split, root)
    if limit_images is not None:
        images, labels = images[:limit_images], labels[:limit_images]
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written: set[int] = set()

    def image(index: int) -> dict:
        if index not in written:
            Image.fromarray(images[index]).save(folder / "images" / f"{index:05d}.png")
            written.add(index)
        return {"image": f"images/{index:05d}.png"}

    path = folder / "documents.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for kind in draw_kinds(count, text_first_share, rng, two_item_share):
            first, second = (int(i) for i in rng.integers(0, len(images), 2))
            out.write(json.dumps(_document(kind, first, second, labels, image)) + "\n")
    return path


def _document(kind, first, second, labels, image) -> dict:
    a, b = int(labels[first]), int(labels[second])
    if kind == "caption_first":
        return {"prompt": [{"text": caption_prompt(a)}], "answer": [image(first)]}
    if kind == "image_first":
        return {"segments": [image(first), {"text": caption_answer(a)}]}
    return {"segments": [{"text": two_items_opening(a)}, image(first), {"text": two_items_middle(b)}, image(second)]}
