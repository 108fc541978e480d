"""The embedded default: Fashion-MNIST documents, the judge, the bundled model's demo page and evaluation, the recipe."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from chameleon_fusion.cli import main as cli_main
from chameleon_fusion.fashion.bundle import BUNDLED, load_bundle
from chameleon_fusion.fashion.documents import (
    CLASS_NAMES,
    caption_answer,
    draw_kinds,
    parse_caption,
    training_texts,
    two_items_middle,
    write_documents,
)
from chameleon_fusion.fashion.evaluate import TARGETS, tokenizer_fidelity
from chameleon_fusion.fashion.judge import FashionJudge
from chameleon_fusion.fashion_mnist import load_fashion_mnist


def test_every_caption_parses_back_to_its_class():
    for label in range(len(CLASS_NAMES)):
        assert parse_caption(caption_answer(label)) == label
        assert parse_caption(two_items_middle(label).replace("and next to it", "")) == label
    assert parse_caption(" this is a hat.") is None
    assert parse_caption("") is None
    assert parse_caption(" this is a t-shirt.") != parse_caption(" this is a shirt.")


def test_document_mix_opens_with_text_sixty_percent_of_the_time():
    kinds = draw_kinds(20000, 0.6, np.random.default_rng(0))
    text_first = np.mean([kind != "image_first" for kind in kinds])
    assert abs(text_first - 0.6) < 0.015
    assert abs(np.mean([kind == "two_items" for kind in kinds]) - 0.2) < 0.015
    more_pages = draw_kinds(20000, 0.6, np.random.default_rng(0), two_item_share=2 / 3)
    assert abs(np.mean([kind == "two_items" for kind in more_pages]) - 0.4) < 0.015


def test_document_shares_outside_zero_to_one_are_refused():
    with pytest.raises(ValueError, match="two_item_share"):
        draw_kinds(10, 0.6, np.random.default_rng(0), two_item_share=1.5)
    with pytest.raises(ValueError, match="text_first_share"):
        draw_kinds(10, -0.1, np.random.default_rng(0))


def test_documents_reference_real_images_with_their_true_captions(tmp_path):
    path = write_documents(tmp_path, "test", count=60, limit_images=50)
    images, labels = load_fashion_mnist("test")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 60
    for document in lines:
        segments = document.get("prompt", []) + document.get("segments", document.get("answer", []))
        for segment in segments:
            if "image" in segment:
                index = int(re.search(r"(\d+)\.png", segment["image"]).group(1))
                assert np.array_equal(np.asarray(Image.open(tmp_path / segment["image"])), images[index])
        if "segments" in document and "image" in document["segments"][0]:  # image first: caption names its class
            index = int(re.search(r"(\d+)\.png", document["segments"][0]["image"]).group(1))
            assert parse_caption(document["segments"][1]["text"]) == labels[index]
    assert all(text in training_texts() for text in (caption_answer(0), two_items_middle(9)))


def test_the_judge_round_trips_through_safetensors(tmp_path):
    judge = FashionJudge()
    judge.save(tmp_path)
    again = FashionJudge.load(tmp_path)
    pictures = [Image.fromarray(image) for image in load_fashion_mnist("test")[0][:20]]
    assert np.array_equal(judge.predict(pictures), again.predict(pictures))
    with pytest.raises(FileNotFoundError, match="recipe fashion"):
        FashionJudge.load(tmp_path / "nothing")


class _ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_demo_writes_a_page_whose_every_image_exists_and_decodes(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--captions", "3"]) == 0
    page = tmp_path / "demo" / "index.html"
    assert str(page.resolve()) in capsys.readouterr().out
    parser = _ImageSources()
    parser.feed(page.read_text())
    assert len(parser.sources) >= 3 + len(CLASS_NAMES) + 2  # captioned images, one drawing per class, a page
    for source in parser.sources:
        with Image.open(tmp_path / "demo" / source) as image:
            image.load()
            assert image.size in ((28, 28), (32, 32))  # real test images, drawn images


def test_eval_prints_every_figure_on_a_small_subset(capsys, tmp_path):
    assert cli_main(["eval", "--limit", "40", "--per-class", "2", "--openings", "10", "--out",
                     str(tmp_path / "metrics.json")]) == 0
    printed = capsys.readouterr().out
    for name in TARGETS:
        assert name in printed
    assert "opens with an image" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_images"] == 40 and 0 <= metrics["caption_accuracy"] <= 1
    assert metrics["samples"] == {"caption_accuracy": 40, "text_to_image_accuracy": 20, "two_item_accuracy": 20}
    share = metrics["caption_accuracy"]
    assert f"{share:.1%} ± {1.96 * (share * (1 - share) / 40) ** 0.5:.1%} of 40" in printed


def test_bundled_model_is_small_and_its_recorded_figures_match_a_fresh_measurement():
    size = sum(path.stat().st_size for path in BUNDLED.rglob("*") if path.is_file())
    assert size <= 25 * 2**20
    model, processor, _, _ = load_bundle()
    recorded = json.loads((BUNDLED / "metrics.json").read_text())
    assert recorded["test_images"] == 10000 and set(TARGETS) <= set(recorded)
    pictures = [Image.fromarray(image) for image in load_fashion_mnist("test")[0][:500]]
    fresh = tokenizer_fidelity(processor, pictures)
    assert abs(fresh["vq_psnr_db"] - recorded["vq_psnr_db"]) < 1.0


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_on_a_tiny_subset(tmp_path):
    assert cli_main(["recipe", "fashion", "--quick", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "model" / "metrics.json").read_text())
    assert set(TARGETS) <= set(metrics) and metrics["recipe_seconds"]["total"] > 0
    assert metrics["recipe_reused_stages"] == []
    model, processor, judge, _ = load_bundle(tmp_path / "run" / "model")
    processor.check_model(model)
    assert cli_main(["recipe", "fashion", "--quick", "--out", str(tmp_path / "run")]) == 0  # again: only evaluates
    metrics = json.loads((tmp_path / "run" / "model" / "metrics.json").read_text())
    assert metrics["recipe_reused_stages"] == ["documents", "tokenizer", "vq", "processor", "decoder", "judge"]
    assert set(metrics["recipe_seconds"]) == {"evaluate", "total"}
