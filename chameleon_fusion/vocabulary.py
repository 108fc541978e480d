"""The one ID space: text ids, special ids, and image code <-> token id, vectorized both ways."""

from __future__ import annotations

import torch

LAYOUT_FIELDS = (
    "vocab_size",
    "text_vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "boi_token_id",
    "eoi_token_id",
    "image_token_id",
    "image_seq_length",
    "image_codebook_size",
    "image_token_offset",
    "image_token_ids",
)


class Vocabulary:
    """Where image codes live in the vocabulary: a contiguous offset (new models) or an explicit map."""

    def __init__(
        self,
        vocab_size: int,
        image_codebook_size: int,
        image_seq_length: int,
        boi_token_id: int | None = None,
        eoi_token_id: int | None = None,
        image_token_id: int | None = None,
        image_token_offset: int | None = None,
        image_token_ids: list[int] | None = None,
        text_vocab_size: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ):
        if (image_token_offset is None) == (image_token_ids is None):
            raise ValueError("give exactly one of image_token_offset and image_token_ids")
        if image_token_ids is None:
            image_token_ids = range(image_token_offset, image_token_offset + image_codebook_size)
        # explicit CPU: models are built under a meta-device context by from_pretrained
        self.code_to_id = torch.as_tensor(list(image_token_ids), dtype=torch.long, device="cpu")
        if self.code_to_id.numel() != image_codebook_size:
            raise ValueError(
                f"image_token_ids has {self.code_to_id.numel()} entries, image_codebook_size is {image_codebook_size}"
            )
        if self.code_to_id.unique().numel() != image_codebook_size:
            raise ValueError("image_token_ids repeats a token id: two codes would share one id")
        if int(self.code_to_id.min()) < 0 or int(self.code_to_id.max()) >= vocab_size:
            raise ValueError(f"image token ids must lie in [0, vocab_size={vocab_size})")
        self.id_to_code = torch.full((vocab_size,), -1, dtype=torch.long, device="cpu")
        self.id_to_code[self.code_to_id] = torch.arange(image_codebook_size, device="cpu")
        self.image_mask = self.id_to_code >= 0
        self.vocab_size = vocab_size
        self.codebook_size = image_codebook_size
        self.image_seq_length = image_seq_length
        self.boi_token_id, self.eoi_token_id, self.image_token_id = boi_token_id, eoi_token_id, image_token_id
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.text_vocab_size = text_vocab_size
        self.image_token_offset = image_token_offset
        self.contiguous = image_token_offset is not None

    @classmethod
    def from_config(cls, config) -> Vocabulary:
        """The layout a model config describes (any object with the layout attributes)."""
        return cls(**{name: getattr(config, name, None) for name in LAYOUT_FIELDS})

    def layout(self) -> dict:
        """The layout as plain fields, the same names as in the model config."""
        return {
            "vocab_size": self.vocab_size,
            "text_vocab_size": self.text_vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids or None,
            "pad_token_id": self.pad_token_id,
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "image_token_id": self.image_token_id,
            "image_seq_length": self.image_seq_length,
            "image_codebook_size": self.codebook_size,
            "image_token_offset": self.image_token_offset,
            "image_token_ids": None if self.contiguous else self.code_to_id.tolist(),
        }

    def check_matches(self, other: Vocabulary | object, what: str = "the model config") -> None:
        """Raise a ValueError naming every field on which two descriptions of the layout disagree."""
        other = other if isinstance(other, Vocabulary) else Vocabulary.from_config(other)
        ours, theirs = self.layout(), other.layout()
        compared_apart = ("image_token_offset", "image_token_ids", "vocab_size")
        wrong = [
            f"{k}: {ours[k]!r} here vs {theirs[k]!r} in {what}"
            for k in ours
            if k not in compared_apart and _differs(ours[k], theirs[k])
        ]
        if theirs["vocab_size"] < ours["vocab_size"]:  # a model may have spare rows, never too few
            wrong.append(f"vocab_size: {ours['vocab_size']} here but only {theirs['vocab_size']} in {what}")
        if not torch.equal(self.code_to_id.cpu(), other.code_to_id.cpu()):
            wrong.append(f"image code -> token id map differs from the one in {what}")
        if wrong:
            raise ValueError("vocabulary layouts disagree: " + "; ".join(wrong))

    def is_image_token(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask: which ids are image codes (ids outside the vocabulary are not)."""
        ids = torch.as_tensor(ids)
        inside = (ids >= 0) & (ids < self.vocab_size)
        return inside & self.image_mask.to(ids.device)[ids.clamp(0, self.vocab_size - 1)]

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codebook indices -> token ids, any shape."""
        codes = torch.as_tensor(codes)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"image codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        return self.code_to_id.to(codes.device)[codes.long()]

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Image token ids -> codebook indices, any shape; a non-image id is an error."""
        ids = torch.as_tensor(ids)
        if not bool(self.is_image_token(ids).all()):
            bad = ids[~self.is_image_token(ids)][:5].tolist()
            raise ValueError(f"ids_to_codes got ids that are not image tokens, e.g. {bad}")
        return self.id_to_code.to(ids.device)[ids.long()]

    def to(self, device) -> Vocabulary:
        """Move the lookup tables (e.g. to the GPU the logits live on)."""
        self.code_to_id = self.code_to_id.to(device)
        self.id_to_code = self.id_to_code.to(device)
        self.image_mask = self.image_mask.to(device)
        return self


def _differs(a, b) -> bool:
    if a is None or b is None:
        return False  # a field one side does not know about cannot disagree
    return a != b
