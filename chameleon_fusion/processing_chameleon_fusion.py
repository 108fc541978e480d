"""Documents <-> ids: text through the BPE tokenizer, images through the VQ-VAE, one sequence in one ID space."""

import hashlib
import os
import warnings

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .image_processing_chameleon_fusion import split_batch
from .modeling_vqvae import ChameleonFusionVQVAE
from .tokenization_chameleon_fusion import token_id
from .vocabulary import Vocabulary

IMAGE_TOKENIZER_FOLDER = "image_tokenizer"
CODES_KEY, DIGEST_KEY = "chameleon_fusion_codes", "chameleon_fusion_pixels_sha256"
GENERATION_MODES = ("text", "image", "interleaved")


class ChameleonFusionProcessor(ProcessorMixin):
    """Holds the text tokenizer, the image processor and the image tokenizer (the VQ-VAE, in `image_tokenizer/`).

    `processor(text=..., images=...)` or `processor(documents=...)` gives input_ids in which every image is
    `<boi>` + image_seq_length image ids + `<eoi>`; `post_process_multimodal_output` turns ids back into
    str / PIL.Image / interleaved lists.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        vq_model: ChameleonFusionVQVAE | None = None,
        image_seq_length: int | None = None,
        image_codebook_size: int | None = None,
        image_token_offset: int | None = None,
        image_token_map: list[int] | None = None,
        image_token: str = "<image>",
        boi_token: str = "<boi>",
        eoi_token: str = "<eoi>",
        image_batch_size: int = 32,
        chat_template=None,
    ):
        self.image_token, self.boi_token, self.eoi_token = image_token, boi_token, eoi_token
        self.image_token_offset, self.image_token_map = image_token_offset, image_token_map
        self.image_seq_length, self.image_codebook_size = image_seq_length, image_codebook_size
        self.image_batch_size = image_batch_size
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.vq_model = None
        if vq_model is not None:
            self.set_image_tokenizer(vq_model)
        elif image_seq_length is None or image_codebook_size is None:
            raise ValueError("give vq_model, or image_seq_length and image_codebook_size for a processor without one")
        self.vocabulary = self._build_vocabulary()

    # --- the ID space ---------------------------------------------------------------------------------------

    def set_image_tokenizer(self, vq_model) -> None:
        """Attach the VQ-VAE; its codebook and grid must agree with the layout this processor was saved with."""
        if not all(hasattr(vq_model, name) for name in ("encode", "decode", "config")):
            raise TypeError(f"vq_model must be a ChameleonFusionVQVAE, got {type(vq_model).__name__}")
        seq_length, codebook = vq_model.config.latent_size**2, vq_model.config.codebook_size
        for name, mine, theirs in (("image_seq_length", self.image_seq_length, seq_length),
                                   ("image_codebook_size", self.image_codebook_size, codebook)):
            if mine is not None and mine != theirs:
                raise ValueError(f"{name} is {mine} in the processor but the image tokenizer gives {theirs}")
        self.image_seq_length, self.image_codebook_size, self.vq_model = seq_length, codebook, vq_model
        if vq_model.config.resolution != self.image_processor.size:
            raise ValueError(
                f"the image processor makes {self.image_processor.size} px images but the image tokenizer reads "
                f"{vq_model.config.resolution} px"
            )

    def _build_vocabulary(self) -> Vocabulary:
        tokenizer = self.tokenizer
        offset = self.image_token_offset
        if self.image_token_map is None and offset is None:
            offset = len(tokenizer)  # new models: image codes right after every token the tokenizer knows
            self.image_token_offset = offset
        last_image_id = offset + self.image_codebook_size - 1 if offset is not None else max(self.image_token_map)
        return Vocabulary(
            vocab_size=max(len(tokenizer), last_image_id + 1),
            text_vocab_size=tokenizer.vocab_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            boi_token_id=token_id(tokenizer, self.boi_token, "begin-of-image token"),
            eoi_token_id=token_id(tokenizer, self.eoi_token, "end-of-image token"),
            image_token_id=token_id(tokenizer, self.image_token, "image placeholder"),
            image_seq_length=self.image_seq_length,
            image_codebook_size=self.image_codebook_size,
            image_token_offset=offset if self.image_token_map is None else None,
            image_token_ids=self.image_token_map,
        )

    def check_model(self, model_or_config) -> None:
        """Raise a ValueError naming every layout field on which the model and this processor disagree."""
        config = getattr(model_or_config, "config", model_or_config)
        self.vocabulary.check_matches(config, what="the model config")

    # --- documents -> ids -----------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        documents: list | None = None,
        return_tensors: str | None = None,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_labels: bool = False,
        add_bos: bool = True,
        add_eos: bool = False,
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        """Text with `<image>` placeholders plus images, or documents (lists of str and images) -> input_ids."""
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if videos is not None or audio is not None:
            raise ValueError("this processor reads text and images only; videos and audio are not supported")
        if documents is not None:
            if text is not None or images is not None:
                raise ValueError("give either documents, or text (and images), not both")
            samples, image_list = self._documents_to_samples(documents)
        elif text is not None:
            samples, image_list = self._text_to_samples(text, images)
        else:
            raise ValueError("give text (with images) or documents")
        image_ids = self.encode_images(image_list) if image_list else []
        sequences = self._assemble(samples, image_ids, add_bos, add_eos)
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            sequences = [self.truncate(ids, max_length) for ids in sequences]
        return self._pad(sequences, padding, max_length, padding_side, return_tensors, return_labels)

    def _text_to_samples(self, text, images):
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list of str")
        counts = [t.count(self.image_token) for t in texts]
        per_text = self._images_per_text(images, counts)
        samples, image_list = [], []
        for t, its_images in zip(texts, per_text):
            pieces = t.split(self.image_token)
            sample = [pieces[0]]
            for piece in pieces[1:]:
                sample += [len(image_list), piece]
                image_list.append(its_images.pop(0))
            samples.append(sample)
        return samples, image_list

    def _images_per_text(self, images, counts: list[int]) -> list[list]:
        if images is None:
            images = []
        nested = isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(i, (list, tuple)) for i in images)
        if nested:
            if len(images) != len(counts):
                raise ValueError(f"images has {len(images)} lists but text has {len(counts)} entries")
            for index, (count, its) in enumerate(zip(counts, images)):
                if count != len(its):
                    raise ValueError(
                        f"text {index} has {count} {self.image_token} placeholders but {len(its)} images were given"
                    )
            return [list(its) for its in images]
        flat = split_batch(images) if not isinstance(images, (list, tuple)) or images else []
        if sum(counts) != len(flat):
            raise ValueError(
                f"text has {sum(counts)} {self.image_token} placeholders but {len(flat)} images were given"
            )
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [list(flat[s : s + c]) for s, c in zip(starts, counts)]

    def _documents_to_samples(self, documents):
        if not isinstance(documents, (list, tuple)) or not all(isinstance(d, (list, tuple)) for d in documents):
            raise TypeError("documents must be a list of documents, each a list of str and images")
        samples, image_list = [], []
        for document in documents:
            sample = []
            for part in document:
                if isinstance(part, str):
                    sample.append(part)
                else:
                    sample.append(len(image_list))
                    image_list.append(part)
            samples.append(sample)
        return samples, image_list

    def encode_images(self, images) -> list[list[int]]:
        """Images -> for each, the `<boi>` + image token ids + `<eoi>` segment, VQ-encoded in batches.

        An image this processor decoded, and that is still pixel for pixel what it decoded, keeps the codes it
        was decoded from: feeding a generated image back (the next turn of a conversation) costs no re-encoding
        loss and no encoder pass.
        """
        if self.vq_model is None:
            raise ValueError("this processor has no image tokenizer (vq_model); it cannot encode images")
        images = split_batch(images)
        codes = [_known_codes(image, self.vocabulary.image_seq_length) for image in images]
        unknown = [i for i, known in enumerate(codes) if known is None]
        if unknown:
            pixel_values = self.image_processor([images[i] for i in unknown], return_tensors="pt")["pixel_values"]
            for index, row in zip(unknown, self._vq_encode(pixel_values)):
                codes[index] = row
        ids = self.vocabulary.codes_to_ids(torch.stack(codes))
        boi, eoi = self.vocabulary.boi_token_id, self.vocabulary.eoi_token_id
        return [[boi, *row, eoi] for row in ids.tolist()]

    def _vq_encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vq = self.vq_model
        codes = []
        with torch.inference_mode():
            for start in range(0, len(pixel_values), self.image_batch_size):
                chunk = pixel_values[start : start + self.image_batch_size].to(vq.device, vq.dtype)
                codes.append(vq.encode(chunk).flatten(1).cpu())
        return torch.cat(codes)

    def _assemble(self, samples, image_ids, add_bos: bool, add_eos: bool) -> list[list[int]]:
        texts = [part for sample in samples for part in sample if isinstance(part, str) and part]
        text_ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        bos, eos = self.vocabulary.bos_token_id, self.vocabulary.eos_token_ids
        sequences = []
        for sample in samples:
            ids = [bos] if add_bos and bos is not None else []
            for part in sample:
                if isinstance(part, int):
                    ids += image_ids[part]
                elif part:
                    ids += next(text_ids)
            sequences.append(ids + (eos[:1] if add_eos else []))
        return sequences

    def truncate(self, ids: list[int], max_length: int) -> list[int]:
        """Cut to max_length tokens, moving the cut before an image segment that would be split."""
        if len(ids) <= max_length:
            return ids
        boi, eoi = self.vocabulary.boi_token_id, self.vocabulary.eoi_token_id
        cut = max_length
        last_boi = max((i for i in range(cut) if ids[i] == boi), default=None)
        if last_boi is not None and eoi not in ids[last_boi:cut]:
            cut = last_boi
        return ids[:cut]

    def _pad(self, sequences, padding, max_length, padding_side, return_tensors, return_labels) -> BatchFeature:
        side = padding_side or getattr(self.tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        target = max(map(len, sequences), default=0)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(target, max_length)
        elif padding not in (True, "longest", False, "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if padding in (False, "do_not_pad"):
            if return_tensors is not None and len(set(map(len, sequences))) > 1:
                raise ValueError("sequences have different lengths; pass padding=True to return tensors")
            target = None
        pad = self.vocabulary.pad_token_id
        if target is not None and pad is None and any(len(s) < target for s in sequences):
            raise ValueError("padding needs a pad token, and the tokenizer has none")
        data = {"input_ids": [], "attention_mask": []}
        for ids in sequences:
            fill = (target - len(ids)) if target is not None else 0
            mask = [1] * len(ids)
            if side == "left":
                ids, mask = [pad] * fill + ids, [0] * fill + mask
            else:
                ids, mask = ids + [pad] * fill, mask + [0] * fill
            data["input_ids"].append(ids)
            data["attention_mask"].append(mask)
        if return_labels:
            data["labels"] = [[i if m else -100 for i, m in zip(ids, mask)]
                              for ids, mask in zip(data["input_ids"], data["attention_mask"])]
        return BatchFeature(data, tensor_type=return_tensors)

    # --- ids -> documents -----------------------------------------------------------------------------------

    def post_process_multimodal_output(self, generated_outputs, skip_special_tokens=True, generation_mode=None, **kwargs):
        """Ids (batch, seq) -> per row: "text" -> str, "image" -> PIL.Image (the last complete image in the row,
        None if there is none), "interleaved" -> list of str and PIL.Image in order."""
        mode = generation_mode or "text"
        if mode not in GENERATION_MODES:
            raise ValueError(f"generation_mode must be one of {GENERATION_MODES}, got {generation_mode!r}")
        parsed = [split_segments(row, self.vocabulary) for row in self._rows(generated_outputs)]
        wanted = [codes for segments in parsed for kind, codes in segments if kind == "image"] if mode != "text" else []
        images = self.decode_images(wanted)
        documents = []
        for segments in parsed:
            document = []  # (kind, value) pairs
            for kind, value in segments:
                if kind == "text":
                    text = self.tokenizer.decode(value, skip_special_tokens=skip_special_tokens, **kwargs)
                    document += [("text", text)] if text else []
                elif kind == "image" and mode != "text":
                    document.append(("image", next(images)))
                elif kind == "broken":
                    warnings.warn(f"malformed image segment: {value}", stacklevel=2)
                    document.append(("broken", f"[{value}]"))
            documents.append(document)
        if mode == "interleaved":
            return [[value for _, value in document] for document in documents]
        if mode == "image":
            return [next((v for k, v in reversed(document) if k == "image"), None) for document in documents]
        return ["".join(v for k, v in document if k == "text") for document in documents]

    def _rows(self, generated_outputs) -> list[list[int]]:
        ids = torch.as_tensor(generated_outputs)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"generated_outputs must be integer ids of shape (batch, seq), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocabulary.vocab_size):
            raise ValueError(
                f"generated_outputs has ids outside the vocabulary [0, {self.vocabulary.vocab_size}): "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        return ids.tolist()

    def decode_images(self, codes: list[list[int]]):
        """Image codebook indices (one list per image) -> an iterator of PIL images, VQ-decoded in batches.

        Each image remembers its codes (and a digest of its pixels), so encoding it again gives them back.
        """
        if not codes:
            return iter(())
        if self.vq_model is None:
            raise ValueError("this processor has no image tokenizer (vq_model); it cannot decode images")
        vq, side = self.vq_model, self.vq_model.config.latent_size
        pictures = []
        with torch.inference_mode():
            for start in range(0, len(codes), self.image_batch_size):
                chunk = torch.tensor(codes[start : start + self.image_batch_size], device=vq.device)
                pictures += self.image_processor.postprocess(vq.decode(chunk.view(-1, side, side)))
        for picture, its_codes in zip(pictures, codes):
            picture.info[CODES_KEY], picture.info[DIGEST_KEY] = list(its_codes), _pixel_digest(picture)
        return iter(pictures)

    # --- devices, saving, loading ---------------------------------------------------------------------------

    def to(self, device):
        """Move the image tokenizer (the only part with weights)."""
        if self.vq_model is not None:
            self.vq_model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.vq_model.device if self.vq_model is not None else torch.device("cpu")

    def to_dict(self):
        held = {name: self.__dict__.pop(name) for name in ("vq_model", "vocabulary") if name in self.__dict__}
        try:
            return super().to_dict()
        finally:
            self.__dict__.update(held)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Tokenizer, image processor and layout as usual; the VQ-VAE weights in `image_tokenizer/`."""
        if self.vq_model is not None:
            self.vq_model.save_pretrained(os.path.join(save_directory, IMAGE_TOKENIZER_FOLDER))
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        vq_model = _load_image_tokenizer(pretrained_model_name_or_path, hub_kwargs)
        if vq_model is not None:
            processor.set_image_tokenizer(vq_model)
        return processor


def _load_image_tokenizer(path, hub_kwargs) -> ChameleonFusionVQVAE | None:
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, IMAGE_TOKENIZER_FOLDER)):
        return None
    try:
        return ChameleonFusionVQVAE.from_pretrained(path, subfolder=IMAGE_TOKENIZER_FOLDER, **hub_kwargs).eval()
    except OSError:
        return None  # a processor published without an image tokenizer


def _pixel_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.mode.encode() + repr(image.size).encode() + image.tobytes()).hexdigest()


def _known_codes(image, image_seq_length: int) -> torch.Tensor | None:
    """The codes an image was decoded from, when it carries them and its pixels were not changed since."""
    if not isinstance(image, Image.Image) or CODES_KEY not in image.info:
        return None
    codes = image.info[CODES_KEY]
    if len(codes) != image_seq_length or image.info.get(DIGEST_KEY) != _pixel_digest(image):
        return None
    return torch.tensor(codes, dtype=torch.long)


def split_segments(ids: list[int], vocabulary: Vocabulary) -> list[tuple[str, object]]:
    """A row of ids -> ("text", ids), ("image", codes) and ("broken", description) segments, in order.

    An image is `<boi>` followed by exactly image_seq_length image ids (then `<eoi>`). Anything else between
    `<boi>` and the next non-image id is reported as broken; stray image ids outside a segment too.
    """
    boi, eoi, length = vocabulary.boi_token_id, vocabulary.eoi_token_id, vocabulary.image_seq_length
    is_image = vocabulary.is_image_token(torch.tensor(ids, dtype=torch.long)).tolist() if ids else []
    segments, text, position = [], [], 0
    while position < len(ids):
        token = ids[position]
        if token == boi or is_image[position]:
            if text:
                segments.append(("text", text))
                text = []
            start = position + (token == boi)
            end = start
            while end < len(ids) and is_image[end] and end - start < length:
                end += 1
            count = end - start
            if token == boi and count == length:
                codes = vocabulary.ids_to_codes(torch.tensor(ids[start:end])).tolist()
                segments.append(("image", codes))
            elif token == boi:
                segments.append(("broken", f"incomplete image: {count} of {length} image tokens"))
            else:
                segments.append(("broken", f"{count} image tokens outside an image segment"))
            position = end + (end < len(ids) and ids[end] == eoi)
            continue
        text.append(token)
        position += 1
    if text:
        segments.append(("text", text))
    return segments


__all__ = ["ChameleonFusionProcessor", "split_segments"]
