"""Rows of input_ids -> a padded batch with labels, choosing which tokens are trained on."""

from dataclasses import dataclass

import torch

from ..vocabulary import Vocabulary

TRAIN_ON = ("all", "text", "image", "answer")


@dataclass
class EarlyFusionCollator:
    """Right-pads `input_ids` and builds labels; padding and untrained tokens get -100.

    train_on: "all"; "text" (every non-image token, `<boi>`/`<eoi>`/eos included); "image" (image codes only);
    "answer" (tokens after `prompt_length`). prompt_dropout: share of prompt/answer rows whose prompt is
    replaced by `unconditional_prompt` (default: bos), the training that classifier-free guidance needs.
    Rows are dicts with `input_ids` and, for "answer" and prompt_dropout, `prompt_length`.
    """

    vocabulary: Vocabulary
    train_on: str = "all"
    prompt_dropout: float = 0.0
    unconditional_prompt: list[int] | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if not isinstance(self.vocabulary, Vocabulary):
            raise TypeError(f"vocabulary must be a Vocabulary (processor.vocabulary), got {type(self.vocabulary).__name__}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must lie in [0, 1], got {self.prompt_dropout}")
        if self.unconditional_prompt is None:
            bos = self.vocabulary.bos_token_id
            self.unconditional_prompt = [bos] if bos is not None else []
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        needs_prompt = self.train_on == "answer" or self.prompt_dropout > 0
        sequences, prompt_lengths = [], []
        for row in rows:
            ids = [int(i) for i in row["input_ids"]]
            prompt_length = int(row.get("prompt_length", 0) or 0)
            if needs_prompt and "prompt_length" not in row:
                raise ValueError(
                    f"train_on={self.train_on!r} / prompt_dropout need a 'prompt_length' in every row; Trainer drops "
                    "columns the model does not take unless TrainingArguments(remove_unused_columns=False)"
                )
            if prompt_length and self.prompt_dropout and torch.rand(()).item() < self.prompt_dropout:
                ids, prompt_length = self.unconditional_prompt + ids[prompt_length:], len(self.unconditional_prompt)
            sequences.append(ids)
            prompt_lengths.append(prompt_length)
        input_ids, attention_mask = self._pad(sequences)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": self._labels(input_ids, attention_mask, prompt_lengths)}

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(map(len, sequences))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.vocabulary.pad_token_id if self.vocabulary.pad_token_id is not None else 0
        input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def _labels(self, input_ids, attention_mask, prompt_lengths) -> torch.Tensor:
        trained = attention_mask.bool()
        if self.train_on == "answer":
            positions = torch.arange(input_ids.shape[1])
            trained &= positions[None, :] >= torch.tensor(prompt_lengths)[:, None]
        elif self.train_on in ("text", "image"):
            is_image = self.vocabulary.is_image_token(input_ids)
            trained &= is_image if self.train_on == "image" else ~is_image
        return input_ids.masked_fill(~trained, -100)
