"""Documents <-> ids: tokenizer training, the one ID space, pixels, the processor both ways, save/load."""

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import CORPUS, tiny_config, tiny_processor, tiny_tokenizer, tiny_vq
from transformers import AutoProcessor, AutoTokenizer

from chameleon_fusion import (
    ChameleonFusionImageProcessor,
    ChameleonFusionProcessor,
    Vocabulary,
    train_bpe_tokenizer,
)
from chameleon_fusion.cli import main as cli_main


def noise_image(width=20, height=30, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


# --- the text tokenizer -------------------------------------------------------------------------------------


def test_train_tokenizer_command_writes_a_tokenizer_with_special_tokens_after_the_text_ids(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    out = tmp_path / "tok"
    assert cli_main(["train-tokenizer", "--files", str(corpus), "--vocab-size", "300", "--out", str(out),
                     "--boi-token", "<racm3:break>", "--eoi-token", "<eoss>"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    specials = tokenizer.convert_tokens_to_ids(["<s>", "</s>", "<pad>", "<image>", "<racm3:break>", "<eoss>"])
    assert specials == list(range(tokenizer.vocab_size, tokenizer.vocab_size + 6))
    text = "héllo wörld, 🙂 a photo of a sneaker"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_train_tokenizer_rejects_missing_files_and_empty_corpora(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        cli_main(["train-tokenizer", "--files", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t")])
    with pytest.raises(ValueError, match="empty"):
        train_bpe_tokenizer(["", ""], show_progress=False)


def test_train_tokenizer_reads_a_datasets_column(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"caption": CORPUS}).save_to_disk(tmp_path / "ds")
    assert cli_main(["train-tokenizer", "--dataset", str(tmp_path / "ds"), "--column", "caption",
                     "--vocab-size", "280", "--out", str(tmp_path / "tok")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").convert_tokens_to_ids("<boi>") is not None


def test_any_existing_fast_tokenizer_works_with_configured_token_names():
    tokenizer = tiny_tokenizer(boi_token="<racm3:break>", eoi_token="<eoss>", image_token="<img>")
    processor = tiny_processor(tokenizer=tokenizer, boi_token="<racm3:break>", eoi_token="<eoss>", image_token="<img>")
    ids = processor(text="a <img> b", images=[noise_image()])["input_ids"][0]
    assert tokenizer.convert_ids_to_tokens(ids[3]) == "<racm3:break>"


def test_a_missing_special_token_is_a_clear_error():
    with pytest.raises(ValueError, match="<racm3:break>"):
        tiny_processor(boi_token="<racm3:break>")


# --- the one ID space ---------------------------------------------------------------------------------------


def test_vocabulary_maps_codes_to_ids_both_ways_contiguous_and_explicit():
    contiguous = Vocabulary(vocab_size=20, image_codebook_size=4, image_seq_length=2, image_token_offset=16)
    explicit = Vocabulary(vocab_size=20, image_codebook_size=4, image_seq_length=2, image_token_ids=[3, 9, 1, 12])
    codes = torch.tensor([[0, 3], [2, 1]])
    assert contiguous.codes_to_ids(codes).tolist() == [[16, 19], [18, 17]]
    assert explicit.codes_to_ids(codes).tolist() == [[3, 12], [1, 9]]
    for vocabulary in (contiguous, explicit):
        assert torch.equal(vocabulary.ids_to_codes(vocabulary.codes_to_ids(codes)), codes)
    assert explicit.is_image_token(torch.tensor([1, 2, 3, 9, 12, 19, -100, 25])).tolist() == [
        True, False, True, True, True, False, False, False]
    with pytest.raises(ValueError, match="not image tokens"):
        explicit.ids_to_codes(torch.tensor([2]))
    with pytest.raises(ValueError, match="image codes must lie"):
        contiguous.codes_to_ids(torch.tensor([4]))
    with pytest.raises(ValueError, match="repeats"):
        Vocabulary(vocab_size=20, image_codebook_size=2, image_seq_length=1, image_token_ids=[3, 3])


def test_model_config_built_from_the_processor_layout_matches_and_a_mismatch_names_the_fields():
    processor = tiny_processor()
    processor.check_model(tiny_config(**processor.vocabulary.layout()))
    wrong = tiny_config(**{**processor.vocabulary.layout(), "boi_token_id": 1, "image_token_offset": 305,
                           "vocab_size": None})
    with pytest.raises(ValueError, match="boi_token_id.*image code -> token id map"):
        processor.check_model(wrong)


# --- pixels -------------------------------------------------------------------------------------------------


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = ChameleonFusionImageProcessor(size=8).to_rgb(rgba)
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((5, 5)) == (255, 255, 255)
    la = ChameleonFusionImageProcessor(size=8).to_rgb(Image.new("LA", (4, 4), (0, 0)))
    assert la.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "1", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_every_pil_mode_becomes_rgb_in_minus_one_to_one(mode):
    image = noise_image(mode=mode) if mode not in ("I;16", "I", "F") else None
    if mode == "I;16":
        image = Image.fromarray(np.full((30, 20), 65535, dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(np.full((30, 20), 40000, dtype=np.int32))
    elif mode == "F":
        image = Image.fromarray(np.full((30, 20), 0.5, dtype=np.float32))
    assert image.mode == mode
    pixels = ChameleonFusionImageProcessor(size=16)(image)["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    if mode == "I;16":
        assert torch.allclose(pixels, torch.ones_like(pixels))  # 16-bit white stays white


def test_palette_image_with_transparency_is_composited():
    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.info["transparency"] = 0
    assert ChameleonFusionImageProcessor(size=6).to_rgb(_png_bytes(palette)).getpixel((2, 2)) == (255, 255, 255)


@pytest.mark.parametrize(
    "image",
    [
        np.full((30, 20, 3), 255, dtype=np.uint8),
        np.full((30, 20), 255, dtype=np.uint8),
        np.ones((30, 20, 3), dtype=np.float32),
        np.ones((3, 30, 20), dtype=np.float64),
        np.full((30, 20), 65535, dtype=np.uint16),
        torch.ones(3, 30, 20),
        torch.full((1, 30, 20), 255, dtype=torch.uint8),
    ],
    ids=["hwc-uint8", "hw-uint8", "hwc-float", "chw-float", "hw-uint16", "chw-torch", "1hw-torch-uint8"],
)
def test_numpy_and_torch_inputs_in_any_layout_give_the_same_white_image(image):
    pixels = ChameleonFusionImageProcessor(size=8)(image)["pixel_values"]
    assert torch.allclose(pixels, torch.ones(1, 3, 8, 8))


def test_crop_keeps_the_center_and_pad_keeps_everything():
    wide = Image.new("RGB", (40, 10), (0, 0, 0))
    wide.paste((255, 0, 0), (0, 0, 10, 10))  # red on the far left
    cropped = ChameleonFusionImageProcessor(size=10, resize_mode="crop").to_square(wide)
    padded = ChameleonFusionImageProcessor(size=10, resize_mode="pad").to_square(wide)
    assert cropped.size == padded.size == (10, 10)
    assert cropped.getpixel((0, 5)) == (0, 0, 0)  # the red edge was cropped away
    assert padded.getpixel((0, 5))[0] > 200 and padded.getpixel((5, 0)) == (255, 255, 255)  # kept, white bars


def test_tiny_and_very_large_images_are_resized():
    processor = ChameleonFusionImageProcessor(size=16)
    pixels = processor([Image.new("RGB", (1, 1), (10, 20, 30)), Image.new("RGB", (6000, 4000), (10, 20, 30))])
    assert pixels["pixel_values"].shape == (2, 3, 16, 16)
    expected = torch.tensor([10, 20, 30]) / 127.5 - 1
    assert torch.allclose(pixels["pixel_values"][:, :, 8, 8], expected.expand(2, 3), atol=1e-6)


def test_postprocess_returns_the_pixels_as_pil():
    processor = ChameleonFusionImageProcessor(size=8)
    image = noise_image(8, 8)
    assert np.array_equal(np.asarray(processor.postprocess(processor(image)["pixel_values"])[0]), np.asarray(image))


def test_bad_images_raise_errors_naming_which_image():
    processor = ChameleonFusionImageProcessor(size=8)
    corrupt = Image.open(io.BytesIO(_png_bytes_raw(noise_image())[:60]))
    with pytest.raises(ValueError, match="image 1 cannot be read"):
        processor([noise_image(), corrupt])
    with pytest.raises(TypeError, match="image 0 must be"):
        processor(["not an image"])
    with pytest.raises(ValueError, match="image 0 .*shape"):
        processor(np.zeros((6, 6, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="resize_mode"):
        ChameleonFusionImageProcessor(resize_mode="stretch")


def _png_bytes_raw(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- the processor: documents -> ids ------------------------------------------------------------------------


def test_each_image_placeholder_becomes_boi_codes_eoi():
    processor = tiny_processor()
    vocabulary = processor.vocabulary
    out = processor(text="look <image> here <image>", images=[noise_image(seed=1), noise_image(seed=2)])
    ids = out["input_ids"][0]
    assert ids[0] == vocabulary.bos_token_id
    boi_positions = [i for i, t in enumerate(ids) if t == vocabulary.boi_token_id]
    assert len(boi_positions) == 2
    for start in boi_positions:
        segment = torch.tensor(ids[start + 1 : start + 1 + vocabulary.image_seq_length])
        assert vocabulary.is_image_token(segment).all()
        assert ids[start + 1 + vocabulary.image_seq_length] == vocabulary.eoi_token_id
    assert vocabulary.image_token_id not in ids


def test_image_codes_are_the_vq_codes_of_the_processed_pixels():
    processor = tiny_processor()
    image = noise_image(seed=3)
    ids = processor(text="<image>", images=[image])["input_ids"][0]
    codes = processor.vq_model.encode(processor.image_processor(image)["pixel_values"]).flatten()
    assert ids[2:-1] == processor.vocabulary.codes_to_ids(codes).tolist()


def test_document_form_equals_text_with_placeholders():
    processor = tiny_processor()
    images = [noise_image(seed=4), noise_image(seed=5)]
    by_text = processor(text=["a photo of <image> and <image>!", "bag"], images=images, padding=True)
    by_document = processor(documents=[["a photo of ", images[0], " and ", images[1], "!"], ["bag"]], padding=True)
    assert by_text["input_ids"] == by_document["input_ids"]


def test_nested_image_lists_go_to_their_own_text():
    processor = tiny_processor()
    a, b = noise_image(seed=6), noise_image(seed=7)
    flat = processor(text=["x <image>", "y <image>"], images=[a, b], padding=True)
    nested = processor(text=["x <image>", "y <image>"], images=[[a], [b]], padding=True)
    assert flat["input_ids"] == nested["input_ids"]


def test_placeholder_count_mismatch_names_both_counts():
    processor = tiny_processor()
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(text="<image> <image>", images=[noise_image()])
    with pytest.raises(ValueError, match="text 1 has 0 <image> placeholders but 1 images"):
        processor(text=["<image>", "none"], images=[[noise_image()], [noise_image()]])


def test_a_corrupt_image_in_a_document_is_named():
    processor = tiny_processor()
    corrupt = Image.open(io.BytesIO(_png_bytes_raw(noise_image())[:60]))
    with pytest.raises(ValueError, match="image 1 cannot be read"):
        processor(documents=[["ok", noise_image()], ["bad", corrupt]])


def test_padding_sides_attention_mask_and_labels():
    processor = tiny_processor()
    pad = processor.vocabulary.pad_token_id
    left = processor(text=["a photo of a sneaker", "bag"], padding=True, padding_side="left", return_tensors="pt",
                     return_labels=True)
    right = processor(text=["a photo of a sneaker", "bag"], padding=True, padding_side="right", return_tensors="pt")
    assert left["input_ids"].shape == right["input_ids"].shape
    assert left["input_ids"][1, 0] == pad and left["attention_mask"][1, 0] == 0 and left["labels"][1, 0] == -100
    assert right["input_ids"][1, -1] == pad and right["attention_mask"][1, -1] == 0
    assert torch.equal(left["labels"][0], left["input_ids"][0])
    with pytest.raises(ValueError, match="padding=True"):
        processor(text=["a photo of a sneaker", "bag"], return_tensors="pt")


def test_truncation_never_cuts_inside_an_image():
    processor = tiny_processor()
    full = processor(text="a <image> b", images=[noise_image()])["input_ids"][0]
    boi = full.index(processor.vocabulary.boi_token_id)
    for max_length in range(boi, len(full)):
        ids = processor(text="a <image> b", images=[noise_image()], truncation=True, max_length=max_length)["input_ids"][0]
        assert len(ids) <= max_length
        inside = processor.vocabulary.boi_token_id in ids
        assert not inside or processor.vocabulary.eoi_token_id in ids  # an image is either whole or absent


def test_empty_text_gives_only_bos():
    processor = tiny_processor()
    assert processor(text="")["input_ids"] == [[processor.vocabulary.bos_token_id]]
    assert processor(text="", add_bos=False, add_eos=True)["input_ids"] == [[processor.vocabulary.eos_token_ids[0]]]


def test_missing_image_tokenizer_is_a_clear_error():
    processor = ChameleonFusionProcessor(ChameleonFusionImageProcessor(size=16), tiny_tokenizer(),
                                         image_seq_length=16, image_codebook_size=32)
    assert processor(text="text only works")["input_ids"]
    with pytest.raises(ValueError, match="no image tokenizer"):
        processor(text="<image>", images=[noise_image()])


# --- the processor: ids -> documents ------------------------------------------------------------------------


def test_post_process_gives_text_images_and_interleaved_documents():
    processor = tiny_processor()
    images = [noise_image(seed=8), noise_image(seed=9)]
    ids = processor(documents=[["a photo of ", images[0], " and ", images[1], " done"], ["only text"]],
                    padding=True, padding_side="left", return_tensors="pt")["input_ids"]
    texts = processor.post_process_multimodal_output(ids, generation_mode="text")
    assert texts == ["a photo of  and  done", "only text"]
    documents = processor.post_process_multimodal_output(ids, generation_mode="interleaved")
    assert [type(part).__name__ for part in documents[0]] == ["str", "Image", "str", "Image", "str"]
    assert documents[0][0] == "a photo of " and documents[1] == ["only text"]
    last_images = processor.post_process_multimodal_output(ids, generation_mode="image")
    assert isinstance(last_images[0], Image.Image) and last_images[1] is None
    assert last_images[0].size == (16, 16)


def test_decode_of_encode_gives_the_same_text_and_images_whose_codes_re_encode_identically():
    processor = tiny_processor()
    document = ["héllo wörld 🙂 ", noise_image(seed=10), " and a tail"]
    ids = processor(documents=[document])["input_ids"]
    decoded = processor.post_process_multimodal_output(ids, generation_mode="interleaved")[0]
    assert decoded[0] == document[0] and decoded[2] == document[2]
    assert processor(documents=[decoded])["input_ids"] == ids  # text and image codes come back identical
    start = ids[0].index(processor.vocabulary.boi_token_id) + 1
    codes = processor.vocabulary.ids_to_codes(torch.tensor(ids[0][start : start + processor.vocabulary.image_seq_length]))
    side = processor.vq_model.config.latent_size
    # the decoded picture is exactly what the VQ decoder draws for those codes
    drawn = processor.image_processor.postprocess(processor.vq_model.decode(codes.view(1, side, side)))[0]
    assert np.array_equal(np.asarray(drawn), np.asarray(decoded[1]))


def test_an_edited_decoded_image_is_encoded_afresh():
    processor = tiny_processor()
    ids = processor(documents=[[noise_image(seed=14)]])["input_ids"]
    edited = processor.post_process_multimodal_output(ids, generation_mode="image")[0].copy()
    edited.paste((255, 255, 255), (0, 0, 8, 8))
    fresh = processor._vq_encode(processor.image_processor(edited)["pixel_values"])
    again = processor(documents=[[edited]])["input_ids"][0]
    assert again[2:-1] == processor.vocabulary.codes_to_ids(fresh[0]).tolist()


def test_a_truncated_image_segment_is_reported_and_the_rest_decodes():
    processor = tiny_processor()
    ids = processor(text="before <image> after", images=[noise_image()])["input_ids"][0]
    boi = ids.index(processor.vocabulary.boi_token_id)
    broken = ids[: boi + 5] + processor.tokenizer(" tail", add_special_tokens=False)["input_ids"]
    with pytest.warns(UserWarning, match="incomplete image: 4 of 16"):
        document = processor.post_process_multimodal_output([broken], generation_mode="interleaved")[0]
    assert document == ["before ", "[incomplete image: 4 of 16 image tokens]", " tail"]
    with pytest.warns(UserWarning):
        assert processor.post_process_multimodal_output([broken], generation_mode="image") == [None]


def test_ids_outside_the_vocabulary_are_an_error():
    processor = tiny_processor()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        processor.post_process_multimodal_output([[1, 2, processor.vocabulary.vocab_size]])


# --- devices, saving, loading -------------------------------------------------------------------------------


def test_to_moves_the_image_tokenizer():
    processor = tiny_processor()
    assert processor.to("cpu") is processor and processor.device.type == "cpu"
    assert next(processor.vq_model.parameters()).device.type == "cpu"


def test_save_and_load_round_trip_everything_including_the_vq_weights(tmp_path):
    processor = tiny_processor(vq_model=tiny_vq(seed=11))
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "image_tokenizer" / "model.safetensors").exists()
    for loaded in (ChameleonFusionProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, ChameleonFusionProcessor)
        assert loaded.vocabulary.layout() == processor.vocabulary.layout()
        for name, tensor in processor.vq_model.state_dict().items():
            assert torch.equal(loaded.vq_model.state_dict()[name], tensor), name
        image = noise_image(seed=12)
        assert loaded(text="x <image>", images=[image])["input_ids"] == processor(text="x <image>", images=[image])["input_ids"]


def test_auto_processor_loads_with_trust_remote_code_where_the_package_is_not_importable(tmp_path):
    processor = tiny_processor()
    processor.save_pretrained(tmp_path / "proc")
    image = noise_image(seed=13)
    image.save(tmp_path / "image.png")
    expected = processor(text="x <image> y", images=[image])["input_ids"]
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["chameleon_fusion"] = None
        from PIL import Image
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path / "proc")!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        ids = processor(text="x <image> y", images=[Image.open({str(tmp_path / "image.png")!r})])["input_ids"]
        print(json.dumps(ids))
        """
    )
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
