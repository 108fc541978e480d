"""transformers' any-to-any pipeline with our model and processor (the pipeline itself needs torchvision)."""

import pytest
import torch
from PIL import Image
from tiny import tiny_config, tiny_processor

from chameleon_fusion import ChameleonFusionForConditionalGeneration

pytest.importorskip("torchvision", reason="transformers' any-to-any pipeline requires torchvision")


@pytest.fixture(scope="module")
def pipe():
    from transformers import pipeline

    processor = tiny_processor()
    torch.manual_seed(0)
    model = ChameleonFusionForConditionalGeneration(tiny_config(**processor.vocabulary.layout())).eval()
    return pipeline("any-to-any", model=model, processor=processor)


def test_pipeline_answers_with_text(pipe):
    out = pipe(text="a photo of", generate_kwargs={"max_new_tokens": 6, "do_sample": False})
    assert isinstance(out[0]["generated_text"], str)


def test_pipeline_answers_with_an_image(pipe):
    out = pipe(text="a photo of", generation_mode="image")
    image = out[0]["generated_image"]
    assert isinstance(image, Image.Image) and image.size == (16, 16)
