"""Generation for early-fusion models: the modality grammar, per-modality sampling and batched CFG, inside generate().

A generated sequence alternates text and image segments; an image segment is `<boi>`, exactly image_seq_length
image ids, `<eoi>`. Three logits processors do the work, usable alone or in any transformers generate():

1. `ImageGuidanceLogitsProcessor` (only with guidance): the batch holds stream groups stacked along dim 0,
   [prompt rows; unconditional rows] or [prompt; image-only; unconditional]. Rows about to draw an image id get
   the guided mix of their group's scores; every row of a prompt gets the same scores.
2. `ModalityConstrainedLogitsProcessor`: -inf on every id the grammar forbids in the row's state.
3. `ModalitySamplingLogitsProcessor`: draws the token itself (image settings inside an image, text settings
   outside) and leaves only that id finite, so greedy search, sampling and beam search all take it, and all the
   stream rows of one prompt take the same one.

Each derives the row states from input_ids at every step (vectorized, reading only the last image_seq_length + 1
ids and the generated part), so beam reordering, caches and left padding need no care.
`ChameleonFusionGenerationMixin.generate` builds them from the model config and the GenerationConfig and runs
them as one `EarlyFusionLogitsProcessor` (same result, row states derived once per step).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass

import torch
import transformers.generation.utils as transformers_generation
from transformers import GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList
from transformers.utils import ModelOutput

from .vocabulary import Vocabulary

GENERATION_MODES = ("text", "image", "interleaved")

# Row states: what the next token may be.
TEXT, TEXT_OR_IMAGE, IMAGE_CODE, END_IMAGE, BEGIN_IMAGE, END_OF_SEQUENCE = range(6)
FORCED_STATES = (END_IMAGE, BEGIN_IMAGE, END_OF_SEQUENCE)

# Extra GenerationConfig attributes (generation_config.json or generate() kwargs) and their defaults.
GENERATION_DEFAULTS = {
    "image_temperature": 1.0,
    "image_top_k": 0,
    "image_top_p": 1.0,
    "text_temperature": None,
    "text_top_k": None,
    "text_top_p": None,
    "max_images": None,
    "text_guidance_scale": None,
    "image_guidance_scale": None,
    "unconditional_ids": None,
}


# --- row states ------------------------------------------------------------------------------------------


def open_image_progress(
    input_ids: torch.Tensor, boi: int | None, eoi: int | None, image_seq_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether the ids end inside an image segment, and how many image ids that segment holds so far.

    Only the last image_seq_length + 1 ids are read: an open segment's `<boi>` cannot lie further back.
    """
    rows = input_ids.shape[0]
    if boi is None or eoi is None or input_ids.shape[1] == 0:
        zeros = torch.zeros(rows, dtype=torch.long, device=input_ids.device)
        return zeros.bool(), zeros
    tail = input_ids[:, -(image_seq_length + 1) :]
    position = torch.arange(1, tail.shape[1] + 1, device=tail.device)
    last_boi = torch.where(tail == boi, position, 0).amax(1)
    last_eoi = torch.where(tail == eoi, position, 0).amax(1)
    return last_boi > last_eoi, tail.shape[1] - last_boi


def next_is_image_code(input_ids: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
    """Per row: True where the grammar makes the next token an image id."""
    inside, drawn = open_image_progress(
        input_ids, vocabulary.boi_token_id, vocabulary.eoi_token_id, vocabulary.image_seq_length
    )
    return inside & (drawn < vocabulary.image_seq_length)


def allowed_token_table(vocabulary: Vocabulary, width: int | None = None) -> torch.Tensor:
    """(number of states, width) bool: the ids each row state allows; ids beyond the vocabulary never."""
    width = width or vocabulary.vocab_size
    image = torch.zeros(width, dtype=torch.bool)
    image[: vocabulary.vocab_size] = vocabulary.image_mask.cpu()
    text = ~image
    text[vocabulary.vocab_size :] = False
    never_in_text = (
        vocabulary.boi_token_id,
        vocabulary.eoi_token_id,
        vocabulary.image_token_id,
        vocabulary.bos_token_id,
        vocabulary.pad_token_id,
    )
    text[[i for i in never_in_text if i is not None]] = False
    text[vocabulary.eos_token_ids] = True

    def only(ids):
        mask = torch.zeros(width, dtype=torch.bool)
        mask[[i for i in ids if i is not None]] = True
        return mask

    boi = only([vocabulary.boi_token_id])
    table = {
        TEXT: text,
        TEXT_OR_IMAGE: text | boi,
        IMAGE_CODE: image,
        END_IMAGE: only([vocabulary.eoi_token_id]),
        BEGIN_IMAGE: boi,
        END_OF_SEQUENCE: only(vocabulary.eos_token_ids),
    }
    return torch.stack([table[state] for state in sorted(table)])


def _check_mode(generation_mode: str, vocabulary: Vocabulary) -> None:
    if generation_mode not in GENERATION_MODES:
        raise ValueError(f"generation_mode must be one of {GENERATION_MODES}, got {generation_mode!r}")
    if generation_mode != "text" and (vocabulary.boi_token_id is None or vocabulary.eoi_token_id is None):
        raise ValueError(f"generation_mode={generation_mode!r} needs boi_token_id and eoi_token_id in the config")
    if generation_mode == "image" and not vocabulary.eos_token_ids:
        raise ValueError("generation_mode='image' needs an eos_token_id to end the sequence after the image")


def _check_max_images(max_images) -> None:
    if max_images is not None and (not isinstance(max_images, int) or isinstance(max_images, bool) or max_images < 0):
        raise ValueError(f"max_images must be None or an integer >= 0, got {max_images!r}")


def _lead_rows(tensor: torch.Tensor, num_stream_groups: int) -> torch.Tensor:
    """The prompt rows of a batch that stacks num_stream_groups stream groups along dim 0."""
    if tensor.shape[0] % num_stream_groups:
        raise ValueError(f"batch of {tensor.shape[0]} rows cannot hold {num_stream_groups} stream groups")
    return tensor[: tensor.shape[0] // num_stream_groups]


_IMAGE_IDS_ON_DEVICE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # vocabulary -> {device: ids}


def image_columns(scores: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor | slice:
    """Index of the image-id columns: a slice for a contiguous layout (views, no copies), else the id tensor."""
    if vocabulary.contiguous:
        return slice(vocabulary.image_token_offset, vocabulary.image_token_offset + vocabulary.codebook_size)
    on_device = _IMAGE_IDS_ON_DEVICE.setdefault(vocabulary, {})
    if scores.device not in on_device:
        on_device[scores.device] = vocabulary.code_to_id.to(scores.device)
    return on_device[scores.device]


class ModalityConstrainedLogitsProcessor(LogitsProcessor):
    """Keeps every row inside the early-fusion grammar of its generation mode.

    - "text": text only (image ids, `<boi>`, `<eoi>`, `<image>`, bos and pad banned).
    - "image": `<boi>` first, image_seq_length image ids, `<eoi>`, then eos.
    - "interleaved": text, and `<boi>` only while a whole image still fits before max_length and fewer than
      max_images images were drawn after the prompt.
    In every mode a row inside an image segment (also one the prompt left open) gets image ids until the segment
    has image_seq_length of them, then `<eoi>`. Forced ids get score 0 (log-probability 1), whatever came before.

    prompt_length is where generation started (default: the length seen at the first call, so use one processor
    per generate() call). With num_stream_groups > 1 (guidance) the states of the prompt rows are used for all
    the stream rows of a prompt.
    """

    def __init__(
        self,
        vocabulary: Vocabulary,
        generation_mode: str = "text",
        max_length: int | None = None,
        max_images: int | None = None,
        prompt_length: int | None = None,
        num_stream_groups: int = 1,
    ):
        _check_mode(generation_mode, vocabulary)
        _check_max_images(max_images)
        self.vocabulary, self.generation_mode = vocabulary, generation_mode
        self.max_length, self.max_images = max_length, max_images
        self.prompt_length, self.num_stream_groups = prompt_length, num_stream_groups
        self._tables: dict = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.apply(scores, self.row_states(_lead_rows(input_ids, self.num_stream_groups)))

    def apply(self, scores: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Mask scores by the states of the prompt rows (one per prompt, shared by its stream rows)."""
        groups = scores.shape[0] // states.shape[0]
        states = states.repeat(groups) if groups > 1 else states
        banned, forced = self._table(scores)
        scores = scores.masked_fill(banned[states], float("-inf"))
        return scores.masked_fill(forced[states], 0.0)

    def apply_shared(self, scores: torch.Tensor, state: int) -> torch.Tensor:
        """apply() for rows that all share one state: one table row broadcast over them, no per-row lookup."""
        banned, forced = self._table(scores)
        scores = scores.masked_fill(banned[state], float("-inf"))
        return scores.masked_fill(forced[state], 0.0) if state in FORCED_STATES else scores

    def row_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The state of every row (TEXT, TEXT_OR_IMAGE, IMAGE_CODE, END_IMAGE, BEGIN_IMAGE, END_OF_SEQUENCE)."""
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        vocabulary = self.vocabulary
        inside, drawn = open_image_progress(
            input_ids, vocabulary.boi_token_id, vocabulary.eoi_token_id, vocabulary.image_seq_length
        )
        in_image = torch.where(drawn < vocabulary.image_seq_length, IMAGE_CODE, END_IMAGE)
        return torch.where(inside, in_image, self._text_states(input_ids))

    def _text_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """States of rows outside an image segment."""
        rows, length = input_ids.shape
        generated = input_ids[:, self.prompt_length :]
        if self.generation_mode == "text":
            return torch.full((rows,), TEXT, device=input_ids.device)
        if self.generation_mode == "image":
            image_done = (generated == self.vocabulary.eoi_token_id).any(1)
            return torch.where(image_done, END_OF_SEQUENCE, BEGIN_IMAGE)
        fits = self.max_length is None or length + self.vocabulary.image_seq_length + 2 <= self.max_length
        may_open = torch.full((rows,), fits, device=input_ids.device)
        if self.max_images is not None:
            may_open &= (generated == self.vocabulary.boi_token_id).sum(1) < self.max_images
        return torch.where(may_open, TEXT_OR_IMAGE, TEXT)

    def _table(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(banned, forced) bool tables (states, vocabulary) on the scores' device: forced = the id of a forced state."""
        key = (scores.device, scores.shape[-1])
        if key not in self._tables:
            allowed = allowed_token_table(self.vocabulary, scores.shape[-1])
            forced = torch.zeros_like(allowed)
            forced[list(FORCED_STATES)] = allowed[list(FORCED_STATES)]
            self._tables[key] = (~allowed).to(scores.device), forced.to(scores.device)
        return self._tables[key]


# --- per-modality sampling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """How one modality's tokens are drawn: temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p!r}")

    @property
    def filters(self) -> bool:
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)


def keep_top_k_top_p(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """-inf outside each row's top_k ids (0 = all), then outside the smallest set holding top_p of the mass.

    top_k and top_p: numbers, or tensors with one value per row.
    """
    rows = logits.shape[0]
    top_k = torch.as_tensor(top_k, device=logits.device).expand(rows)
    top_p = torch.as_tensor(top_p, dtype=logits.dtype, device=logits.device).expand(rows)
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    beyond_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(beyond_k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    beyond_p = probs.cumsum(-1) - probs >= top_p[:, None]  # the most likely id always stays
    sorted_logits = sorted_logits.masked_fill(beyond_p, float("-inf"))
    return logits.scatter(-1, order, sorted_logits)


def sample_rows(logits: torch.Tensor) -> torch.Tensor:
    """One index per row drawn from softmax(logits), by inverting the CDF with one uniform number per row."""
    cdf = logits.softmax(-1).cumsum(-1)
    threshold = torch.rand(logits.shape[0], 1, device=logits.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, threshold, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


def keep_only(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-inf everywhere except at one id per row, which keeps its score."""
    return torch.full_like(scores, float("-inf")).scatter_(1, ids[:, None], scores.gather(1, ids[:, None]))


def draw_tokens(scores: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """One index per row: argmax at temperature 0, else a sample after temperature, top-k and top-p."""
    if settings.temperature == 0:
        return scores.argmax(-1)
    logits = scores if settings.temperature == 1 else scores / settings.temperature
    if settings.filters:
        logits = keep_top_k_top_p(logits, settings.top_k, settings.top_p)
    return sample_rows(logits)


class ModalitySamplingLogitsProcessor(LogitsProcessor):
    """Draws the next token itself, with the image settings in rows about to draw an image id and the text
    settings elsewhere, and returns scores that are -inf except at the drawn id (which keeps its score).

    Greedy search, sampling and beam search therefore all take the drawn id: image tokens are sampled even when
    text is greedy (greedy image tokens give blank images). With text=None, rows outside images are returned
    untouched (for greedy text, or beam search over text). With num_stream_groups > 1 one draw per prompt row is
    given to all its stream rows, so a guided prompt and its unconditional twin stay in step. Image ids are
    drawn among the image columns only (a codebook is smaller than the vocabulary).
    """

    def __init__(
        self,
        vocabulary: Vocabulary,
        image: SamplingSettings | None = None,
        text: SamplingSettings | None = None,
        num_stream_groups: int = 1,
    ):
        self.vocabulary = vocabulary
        self.image, self.text = image or SamplingSettings(), text
        self.num_stream_groups = num_stream_groups

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lead_rows = _lead_rows(input_ids, self.num_stream_groups)
        return self.apply(scores, next_is_image_code(lead_rows, self.vocabulary))

    def apply(self, scores: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        """Leave only the drawn id finite in the selected rows (image rows; every row when text is set).

        image_rows holds one flag per prompt row; scores may hold the stream rows too (stacked after them).
        """
        groups = scores.shape[0] // image_rows.shape[0]
        lead_scores = scores[: image_rows.shape[0]]
        chosen = self._draw_image_ids(lead_scores, image_rows)
        if self.text is not None:
            chosen = torch.where(image_rows, chosen, draw_tokens(lead_scores, self.text))
        if groups > 1:
            chosen, image_rows = chosen.repeat(groups), image_rows.repeat(groups)
        only_chosen = keep_only(scores, chosen)
        if self.text is not None:
            return only_chosen
        return torch.where(image_rows[:, None], only_chosen, scores)

    def _draw_image_ids(self, scores: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        """An image id per row drawn among the image columns (meaningful where image_rows is True)."""
        columns = image_columns(scores, self.vocabulary)
        image_scores = torch.where(image_rows[:, None], scores[:, columns], 0.0)  # other rows may allow no image id
        codes = draw_tokens(image_scores, self.image)
        return codes + columns.start if isinstance(columns, slice) else columns[codes]


# --- classifier-free guidance ----------------------------------------------------------------------------


class ImageGuidanceLogitsProcessor(LogitsProcessor):
    """Classifier-free guidance for image tokens, over stream groups stacked along the batch (one forward).

    Two groups [prompt p; unconditional u]: guided = u + text_guidance_scale * (p - u).
    Three groups [prompt p; image-only i; unconditional u] (Chameleon's instruct guidance):
    guided = u + image_guidance_scale * (i - u) + text_guidance_scale * (p - i).
    Rows about to draw an image id get the guided scores on the image ids (their other ids keep the prompt
    stream's scores: the grammar bans them there); other rows get the prompt stream's scores. Every stream row of
    a prompt gets the same scores. An image id that is -inf in any stream stays -inf.
    """

    def __init__(self, vocabulary: Vocabulary, text_guidance_scale: float, image_guidance_scale: float | None = None):
        self.vocabulary = vocabulary
        self.text_guidance_scale, self.image_guidance_scale = float(text_guidance_scale), image_guidance_scale
        self.num_stream_groups = 2 if image_guidance_scale is None else 3

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lead_rows = _lead_rows(input_ids, self.num_stream_groups)
        return self.apply(scores, next_is_image_code(lead_rows, self.vocabulary)).repeat(self.num_stream_groups, 1)

    def apply(self, scores: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
        """The prompt rows' scores (batch, vocabulary) with guided image ids where image_rows is True."""
        _lead_rows(scores, self.num_stream_groups)  # checks that the rows split into the stream groups
        streams = scores.chunk(self.num_stream_groups)
        columns = image_columns(scores, self.vocabulary)
        guided = self.guide(*(stream[:, columns] for stream in streams))
        combined = streams[0].clone()
        combined[:, columns] = torch.where(image_rows[:, None], guided, streams[0][:, columns])
        return combined

    def guide(self, prompt: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        """The guidance formula on matching rows of the stream groups."""
        unconditional = others[-1]
        if self.image_guidance_scale is None:
            guided = unconditional + self.text_guidance_scale * (prompt - unconditional)
        else:
            image_only = others[0]
            guided = (
                unconditional
                + self.image_guidance_scale * (image_only - unconditional)
                + self.text_guidance_scale * (prompt - image_only)
            )
        return guided.masked_fill(guided.isnan(), float("-inf"))  # -inf in a stream gives nan or -inf: banned


class StateSchedule:
    """The row states of a "text" or "image" generation, read off the prompt once and looked up at every step.

    In those modes the grammar leaves no choice of segment: a segment the prompt left open is finished, then
    "image" draws `<boi>`, image_seq_length image ids, `<eoi>` and eos, and "text" stays text. As long as each
    step appends the token the processors allowed (as generate() does), the state of a row at step t is its
    schedule's column t (the last column from then on). Beam reordering moves rows only among the beams of one
    prompt, which share a schedule.
    """

    def __init__(self, grammar: ModalityConstrainedLogitsProcessor):
        if grammar.generation_mode not in ("text", "image"):
            raise ValueError(f"states follow from the prompt in 'text' and 'image' modes, not {grammar.generation_mode!r}")
        self.grammar = grammar
        self.table: torch.Tensor | None = None  # (steps, rows) on the ids' device
        self.shared: list[int | None] = []  # per step: the state every row is in, or None when they differ

    def at(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """The states of the rows at this step, and the state they all share (None when they differ)."""
        if self.table is None:
            self._read_prompt(input_ids)
        step = min(input_ids.shape[1] - self.grammar.prompt_length, len(self.shared) - 1)
        return self.table[step], self.shared[step]

    def _read_prompt(self, input_ids: torch.Tensor) -> None:
        grammar, vocabulary = self.grammar, self.grammar.vocabulary
        if grammar.prompt_length is None:
            grammar.prompt_length = input_ids.shape[1]
        inside, drawn = open_image_progress(
            input_ids[:, : grammar.prompt_length], vocabulary.boi_token_id, vocabulary.eoi_token_id,
            vocabulary.image_seq_length,
        )
        rows = [self._row_states(*row) for row in zip(inside.tolist(), drawn.tolist())]  # the one host sync
        steps = max(len(row) for row in rows)
        rows = [row + row[-1:] * (steps - len(row)) for row in rows]
        columns = list(zip(*rows))
        self.shared = [column[0] if len(set(column)) == 1 else None for column in columns]
        self.table = torch.tensor(columns, device=input_ids.device)

    def _row_states(self, inside: bool, drawn: int) -> list[int]:
        codes = self.grammar.vocabulary.image_seq_length
        states = [IMAGE_CODE] * (codes - drawn) + [END_IMAGE] if inside else []
        if self.grammar.generation_mode == "text":
            return states + [TEXT]
        if not inside:
            states += [BEGIN_IMAGE] + [IMAGE_CODE] * codes + [END_IMAGE]
        return states + [END_OF_SEQUENCE]


class EarlyFusionLogitsProcessor(LogitsProcessor):
    """Guidance (optional), grammar and sampling in one processor: the row states are derived once per step, and
    with guidance the work runs on the prompt rows only, copied to the stream rows at the end.

    What generate() uses; it gives the same scores as the three processors applied one after the other. With
    states_from_prompt ("text" and "image" modes, driven by generate()) the states come from a `StateSchedule`,
    a step where every row draws an image id touches only the image columns, and a step where none does skips the
    image draw (so sampled tokens use other random numbers: the same distributions, not the same tokens for a seed).
    """

    def __init__(
        self,
        grammar: ModalityConstrainedLogitsProcessor,
        sampling: ModalitySamplingLogitsProcessor,
        guidance: ImageGuidanceLogitsProcessor | None = None,
        states_from_prompt: bool = False,
    ):
        groups = {p.num_stream_groups for p in (grammar, sampling, guidance) if p is not None}
        if len(groups) != 1 or (guidance is None and groups != {1}):
            raise ValueError(f"stream groups need guidance and one num_stream_groups, got {sorted(groups)}")
        self.grammar, self.sampling, self.guidance = grammar, sampling, guidance
        self.num_stream_groups = groups.pop()
        self.schedule = StateSchedule(grammar) if states_from_prompt else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lead_rows = _lead_rows(input_ids, self.num_stream_groups)
        if self.schedule is None:
            states, shared = self.grammar.row_states(lead_rows), None
        else:
            states, shared = self.schedule.at(lead_rows)
        if shared == IMAGE_CODE:
            scores = self._draw_image_ids(scores)
        elif shared is not None:  # no row draws an image id: the prompt stream's scores, masked, maybe a text draw
            scores = self.grammar.apply_shared(scores[: states.shape[0]], shared)
            if self.sampling.text is not None:
                scores = keep_only(scores, draw_tokens(scores, self.sampling.text))
        else:
            image_rows = states == IMAGE_CODE
            if self.guidance is not None:
                scores = self.guidance.apply(scores, image_rows)
            scores = self.sampling.apply(self.grammar.apply(scores, states), image_rows)
        return scores.repeat(self.num_stream_groups, 1) if self.num_stream_groups > 1 else scores

    def _draw_image_ids(self, scores: torch.Tensor) -> torch.Tensor:
        """Every row draws an image id: (guided) image scores, one draw per prompt row, -inf except at the draw."""
        columns = image_columns(scores, self.sampling.vocabulary)
        streams = scores.chunk(self.num_stream_groups)
        image_scores = streams[0][:, columns]
        if self.guidance is not None:
            image_scores = self.guidance.guide(*(stream[:, columns] for stream in streams))
        codes = draw_tokens(image_scores, self.sampling.image)[:, None]
        only_drawn, drawn_scores = torch.full_like(streams[0], float("-inf")), image_scores.gather(1, codes)
        if isinstance(columns, slice):
            only_drawn[:, columns].scatter_(1, codes, drawn_scores)  # a view: writes into only_drawn
        else:
            only_drawn.scatter_(1, columns[codes], drawn_scores)
        return only_drawn


@dataclass
class GuidanceStreams:
    """The rows of one guided generate(): B prompt rows, then B image-only rows (3-way), then B unconditional rows.

    The unconditional rows see their reduced prompt and, of the generated ids, only the current image segment
    (from its `<boi>` on): at every image they are "unconditional_ids + <boi> + image ids so far", the stream
    Chameleon restarts per image. The image-only rows see the prompt's images and the generated images, not the
    text. Both follow the prompt rows' tokens; attention masks and positions (counted over visible ids) do the rest.
    """

    num_groups: int
    prompt_mask: torch.Tensor  # (num_groups * prompts, prompt_length), left padding
    vocabulary: Vocabulary
    _image_mask: torch.Tensor | None = None

    @property
    def prompt_length(self) -> int:
        return self.prompt_mask.shape[1]

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(rows, length) visibility of every id for the next forward."""
        generated = input_ids[:, self.prompt_length :]
        visible = torch.ones_like(generated, dtype=torch.bool)
        batch, columns = input_ids.shape[0] // self.num_groups, generated.shape[1]
        if columns:
            position = torch.arange(1, columns + 1, device=generated.device)
            unconditional = generated[-batch:]
            segment_start = torch.where(unconditional == self.vocabulary.boi_token_id, position, 1).amax(1)
            visible[-batch:] = position >= segment_start[:, None]
            if self.num_groups == 3:
                visible[batch : 2 * batch] = self._image_ids(generated[batch : 2 * batch])
                visible[batch : 2 * batch, -1] = True
        return torch.cat([self.prompt_mask.to(visible.device), visible.long()], dim=1)

    def _image_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """True at image ids, `<boi>` and `<eoi>` (the image mask is copied to the ids' device once)."""
        vocabulary = self.vocabulary
        if self._image_mask is None or self._image_mask.device != ids.device:
            self._image_mask = vocabulary.image_mask.to(ids.device)
        return (
            self._image_mask[ids.clamp(0, vocabulary.vocab_size - 1)]
            | (ids == vocabulary.boi_token_id)
            | (ids == vocabulary.eoi_token_id)
        )


def open_segment(ids: list[int], vocabulary: Vocabulary) -> list[int]:
    """The `<boi>` and image ids at the end of a prompt that stops inside an image segment ([] otherwise)."""
    tail = ids[-(vocabulary.image_seq_length + 1) :]
    for back in range(len(tail) - 1, -1, -1):
        if tail[back] == vocabulary.eoi_token_id:
            return []
        if tail[back] == vocabulary.boi_token_id:
            return tail[back:]
    return []


def build_guidance_streams(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    vocabulary: Vocabulary,
    unconditional_ids: list[int],
    image_only: bool,
) -> tuple[torch.Tensor, torch.Tensor, GuidanceStreams]:
    """Stack prompt, (image-only,) unconditional rows, left-padded to one length: input_ids, attention_mask, plan."""
    prompts = _unpadded_rows(input_ids, attention_mask)
    groups = [prompts]
    if image_only:
        keep = set(vocabulary.code_to_id.tolist()) | {
            vocabulary.bos_token_id,
            vocabulary.boi_token_id,
            vocabulary.eoi_token_id,
        }
        groups.append([[i for i in row if i in keep] for row in prompts])
    groups.append([list(unconditional_ids) + open_segment(row, vocabulary) for row in prompts])
    rows = [row for group in groups for row in group]
    length = max(len(row) for row in rows)
    pad = vocabulary.pad_token_id if vocabulary.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows], device=input_ids.device)
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows], device=input_ids.device)
    plan = GuidanceStreams(len(groups), mask, vocabulary)
    return ids, mask, plan


def _unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if attention_mask is None:
        return input_ids.tolist()
    return [[i for i, m in zip(row, mask) if m] for row, mask in zip(input_ids.tolist(), attention_mask.tolist())]


# --- generate() ------------------------------------------------------------------------------------------


@dataclass
class GenerationPlan:
    """What generate() decided before handing over to transformers' decoding loop."""

    generation_mode: str
    max_new_tokens: int
    max_images: int | None
    image_sampling: SamplingSettings
    text_sampling: SamplingSettings | None
    text_guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    unconditional_ids: list[int] | None = None
    streams: GuidanceStreams | None = None

    @property
    def guided(self) -> bool:
        return self.text_guidance_scale is not None

    @property
    def stream_groups(self) -> int:
        return 1 if not self.guided else 2 if self.image_guidance_scale is None else 3


@contextlib.contextmanager
def stop_checks_deferred_on(device: torch.device):
    """Let transformers' sampling loop read "all rows finished?" one step late on CUDA too, as it does on mps.

    Read at once, that flag makes the host wait for the GPU at every token, and the GPU then idles while the host
    prepares the next step; read a step late, the host queues step t+1 while the GPU runs step t. Both ways give
    the same tokens (a step run past the end is undone by transformers), so a thread that sees the other way
    while another generate() holds this switch loses only speed. Does nothing where transformers lacks the hook.
    """
    deferred = getattr(transformers_generation, "DeferredStopCheck", None)
    original = vars(deferred).get("is_supported") if deferred is not None else None
    if device.type != "cuda" or not isinstance(original, staticmethod):
        yield
        return

    def is_supported(device, cache, cache_is_returned, is_assistant):
        if device.type != "cuda" or is_assistant:
            return original.__func__(device, cache, cache_is_returned, is_assistant)
        return cache is None or cache.is_croppable or not cache_is_returned

    deferred.is_supported = staticmethod(is_supported)
    try:
        yield
    finally:
        deferred.is_supported = original


class ChameleonFusionGenerationMixin(GenerationMixin):
    """`generate(..., generation_mode="text"|"image"|"interleaved")` with the grammar, per-modality sampling and
    batched classifier-free guidance; everything else is transformers' generate().

    Extra settings, as generate() kwargs or GenerationConfig attributes (generation_config.json):
        image_temperature (1.0; 0 = greedy), image_top_k (0 = off), image_top_p (1.0 = off): image tokens.
        text_temperature, text_top_k, text_top_p: text tokens; by default the standard do_sample, temperature,
            top_k and top_p (greedy unless do_sample=True).
        max_images: at most this many images per row in "interleaved" mode (None = no limit).
        text_guidance_scale: classifier-free guidance of image tokens, guided = u + scale * (p - u) with p the
            prompt stream and u the unconditional one (both in one batched forward).
        image_guidance_scale: adds Chameleon's image-only stream i (the prompt without its text):
            guided = u + image_guidance_scale * (i - u) + text_guidance_scale * (p - i); text_guidance_scale
            defaults to 1.0 then.
        unconditional_ids: the unconditional stream's prompt (default [bos]); it sees `<boi>` and the image ids
            of the image being drawn after it.
    Without max_new_tokens / max_length, "image" mode draws one image and eos, other modes 20 tokens.
    With guidance, the returned sequences (and scores) are the prompt rows only.
    """

    def generate(self, inputs=None, generation_config=None, logits_processor=None, generation_mode=None, **kwargs):
        """transformers' generate() plus the early-fusion processors; see the class docstring for the extra settings."""
        ours = {name: kwargs.pop(name) for name in GENERATION_DEFAULTS if name in kwargs}
        length_given = kwargs.get("max_length") is not None or self.generation_config.max_length is not None or (
            generation_config is not None and generation_config.max_length is not None
        )
        return_sequences = kwargs.pop("num_return_sequences", None)  # transformers refuses it for greedy loops
        generation_config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        if return_sequences is not None:
            generation_config.num_return_sequences = return_sequences
        for name in ("output_attentions", "output_hidden_states"):
            model_kwargs.pop(name, None)  # already in generation_config
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (inputs)")
        settings = {name: ours.get(name, getattr(generation_config, name, default))
                    for name, default in GENERATION_DEFAULTS.items()}
        input_ids, model_kwargs = _repeat_for_return_sequences(input_ids, model_kwargs, generation_config)
        prompts = _unpadded_rows(input_ids, model_kwargs.get("attention_mask"))
        plan = self._plan(prompts, input_ids.shape[1], generation_config, generation_mode or "text", settings,
                          length_given)
        if plan.guided:
            input_ids, model_kwargs["attention_mask"], plan.streams = build_guidance_streams(
                input_ids, model_kwargs.get("attention_mask"), self.vocabulary, plan.unconditional_ids,
                image_only=plan.stream_groups == 3,
            )
        processors = LogitsProcessorList([*(logits_processor or []), *self._modality_processors(plan, input_ids)])
        self._guidance_streams = plan.streams
        try:
            with stop_checks_deferred_on(input_ids.device):
                output = super().generate(
                    input_ids,
                    generation_config=self._loop_config(generation_config, plan),
                    logits_processor=processors,
                    **model_kwargs,
                )
        finally:
            self._guidance_streams = None
        return keep_prompt_rows(output, plan.stream_groups) if plan.guided else output

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """With guidance, replace the attention mask and positions so that each stream sees only what it should."""
        streams = getattr(self, "_guidance_streams", None)
        if streams is not None:
            attention_mask = streams.attention_mask(input_ids)
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)

    def _plan(self, prompts, prompt_length, generation_config, generation_mode, settings, length_given):
        _check_mode(generation_mode, self.vocabulary)
        _check_max_images(settings["max_images"])
        plan = GenerationPlan(
            generation_mode=generation_mode,
            max_new_tokens=self._max_new_tokens(generation_config, generation_mode, prompts, prompt_length,
                                                length_given),
            max_images=settings["max_images"],
            image_sampling=SamplingSettings(*(
                kind(GENERATION_DEFAULTS[name] if settings[name] is None else settings[name])
                for name, kind in (("image_temperature", float), ("image_top_k", int), ("image_top_p", float))
            )),
            text_sampling=_text_sampling(settings, generation_config),
        )
        if settings["text_guidance_scale"] is not None or settings["image_guidance_scale"] is not None:
            self._plan_guidance(plan, prompts, generation_config, settings)
        return plan

    def _max_new_tokens(self, generation_config, generation_mode, prompts, prompt_length, length_given) -> int:
        """max_new_tokens, else max_length - prompt length, else one image in "image" mode and 20 otherwise."""
        needed = max(_tokens_for_an_image(row, self.vocabulary) for row in prompts)
        if generation_config.max_new_tokens is not None:
            budget = generation_config.max_new_tokens
        elif length_given:
            budget = generation_config.max_length - prompt_length
        else:
            budget = needed + 1 if generation_mode == "image" else 20
        if generation_mode == "image" and budget < needed:
            raise ValueError(
                f"max_new_tokens={budget} cannot hold an image: generation_mode='image' needs {needed} new tokens "
                f"(<boi>, {self.vocabulary.image_seq_length} image tokens, <eoi>)"
            )
        return budget

    def _plan_guidance(self, plan: GenerationPlan, prompts, generation_config, settings) -> None:
        name = "text_guidance_scale" if settings["text_guidance_scale"] is not None else "image_guidance_scale"
        if plan.generation_mode == "text":
            raise ValueError(f"{name} guides image tokens; generation_mode='text' draws none")
        if (generation_config.num_beams or 1) > 1:
            raise ValueError(f"{name} needs num_beams=1: the stream rows of a prompt must take one drawn token")
        for scale in ("text_guidance_scale", "image_guidance_scale"):
            value = settings[scale]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{scale} must be a number, got {value!r}")
        image_codes = set(self.vocabulary.code_to_id.tolist())
        if settings["image_guidance_scale"] is not None and not any(image_codes.intersection(r) for r in prompts):
            raise ValueError(
                "image_guidance_scale conditions on the prompt's images and no prompt has one; "
                "use text_guidance_scale alone for guidance by the prompt"
            )
        text_scale = settings["text_guidance_scale"]
        plan.text_guidance_scale = 1.0 if text_scale is None else float(text_scale)
        if settings["image_guidance_scale"] is not None:
            plan.image_guidance_scale = float(settings["image_guidance_scale"])
        plan.unconditional_ids = self._unconditional_ids(settings["unconditional_ids"])

    def _unconditional_ids(self, unconditional_ids) -> list[int]:
        vocabulary = self.vocabulary
        if unconditional_ids is None:
            if vocabulary.bos_token_id is None:
                raise ValueError("unconditional_ids is needed for guidance: the vocabulary has no bos_token_id")
            return [vocabulary.bos_token_id]
        ids = torch.as_tensor(unconditional_ids).flatten().tolist()
        if not ids:
            raise ValueError("unconditional_ids must hold at least one id (e.g. [bos_token_id])")
        if any(not 0 <= i < vocabulary.vocab_size for i in ids):
            raise ValueError(f"unconditional_ids must lie in [0, vocab_size={vocabulary.vocab_size})")
        segment_ids = {vocabulary.boi_token_id, vocabulary.eoi_token_id, vocabulary.image_token_id}
        if any(i in segment_ids for i in ids) or bool(vocabulary.is_image_token(torch.tensor(ids)).any()):
            raise ValueError(
                "unconditional_ids must be text (no image ids, <boi>, <eoi> or <image>): the image part of the "
                "unconditional stream follows the generated image"
            )
        return ids

    def _modality_processors(self, plan: GenerationPlan, input_ids) -> list[LogitsProcessor]:
        """Guidance (when asked), grammar, sampling: one processor, after transformers' own ones."""
        vocabulary, groups = self.vocabulary, plan.stream_groups
        guidance = (
            ImageGuidanceLogitsProcessor(vocabulary, plan.text_guidance_scale, plan.image_guidance_scale)
            if plan.guided else None
        )
        grammar = ModalityConstrainedLogitsProcessor(
            vocabulary,
            plan.generation_mode,
            max_length=input_ids.shape[1] + plan.max_new_tokens,
            max_images=plan.max_images,
            prompt_length=input_ids.shape[1],
            num_stream_groups=groups,
        )
        sampling = ModalitySamplingLogitsProcessor(
            vocabulary, plan.image_sampling, plan.text_sampling, num_stream_groups=groups
        )
        states_from_prompt = plan.generation_mode in ("text", "image")
        return [EarlyFusionLogitsProcessor(grammar, sampling, guidance, states_from_prompt)]

    @staticmethod
    def _loop_config(generation_config, plan: GenerationPlan):
        """The config transformers' loop runs with: our length, and greedy selection when we draw the text."""
        config = copy.deepcopy(generation_config)
        config.max_new_tokens, config.max_length = plan.max_new_tokens, None
        if plan.text_sampling is not None:
            config.do_sample, config.temperature, config.top_k, config.top_p = False, None, None, None
        return config


def generation_config_with(generation_config: GenerationConfig, **settings) -> GenerationConfig:
    """A copy of generation_config carrying extra settings (GENERATION_DEFAULTS names) that survive saving.

    transformers drops unknown keys when it loads a generation_config.json flagged as derived from the model
    config (a model's default one is); the copy is no longer flagged, so its settings load back.
    """
    unknown = sorted(set(settings) - set(GENERATION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown generation settings {unknown}; known: {sorted(GENERATION_DEFAULTS)}")
    config = copy.deepcopy(generation_config)
    config._from_model_config = False
    for name, value in settings.items():
        setattr(config, name, value)
    return config


def _repeat_for_return_sequences(input_ids, model_kwargs, generation_config):
    """Without beams, repeat each prompt num_return_sequences times here (and run the loop with 1): the loop's
    own repetition needs do_sample=True, and our sampler draws the tokens with the loop left greedy."""
    repeats = generation_config.num_return_sequences or 1
    if repeats == 1 or (generation_config.num_beams or 1) > 1:
        return input_ids, model_kwargs
    rows = input_ids.shape[0]
    model_kwargs = {
        name: value.repeat_interleave(repeats, dim=0)
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows else value
        for name, value in model_kwargs.items()
    }
    generation_config.num_return_sequences = 1
    return input_ids.repeat_interleave(repeats, dim=0), model_kwargs


def _text_sampling(settings: dict, generation_config) -> SamplingSettings | None:
    """Text settings for our sampler, or None when text is greedy or left to beam search."""
    explicit = {name: settings[f"text_{name}"] for name in ("temperature", "top_k", "top_p")}
    beams = (generation_config.num_beams or 1) > 1
    if beams:
        given = [f"text_{name}" for name, value in explicit.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need num_beams=1; beam search chooses the text tokens")
        return None
    do_sample = bool(generation_config.do_sample)
    temperature = explicit["temperature"]
    if temperature is None:
        temperature = (generation_config.temperature or 1.0) if do_sample else 0.0
    if temperature == 0:
        return None
    top_k, top_p = explicit["top_k"], explicit["top_p"]
    if top_k is None:
        top_k = (generation_config.top_k or 0) if do_sample else 0
    if top_p is None:
        top_p = generation_config.top_p or 1.0
    return SamplingSettings(float(temperature), int(top_k), float(top_p))


def _tokens_for_an_image(prompt: list[int], vocabulary: Vocabulary) -> int:
    """New tokens needed to finish one image: <boi> + codes + <eoi>, or the rest of the segment a prompt left open."""
    segment = open_segment(prompt, vocabulary)
    if segment:
        return vocabulary.image_seq_length - (len(segment) - 1) + 1
    return vocabulary.image_seq_length + 2


def keep_prompt_rows(output, num_groups: int):
    """Drop the guidance rows from generate()'s output (a tensor, or sequences/scores/logits of a ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output[: output.shape[0] // num_groups]
    if isinstance(output, ModelOutput):
        rows = output.sequences.shape[0] // num_groups
        output.sequences = output.sequences[:rows]
        for name in ("scores", "logits"):
            if getattr(output, name, None) is not None:
                setattr(output, name, tuple(step[:rows] for step in getattr(output, name)))
    return output


__all__ = [
    "GENERATION_MODES",
    "GENERATION_DEFAULTS",
    "ChameleonFusionGenerationMixin",
    "EarlyFusionLogitsProcessor",
    "ImageGuidanceLogitsProcessor",
    "ModalityConstrainedLogitsProcessor",
    "ModalitySamplingLogitsProcessor",
    "SamplingSettings",
    "StateSchedule",
    "GuidanceStreams",
    "build_guidance_streams",
    "generation_config_with",
    "draw_tokens",
    "image_columns",
    "keep_top_k_top_p",
    "sample_rows",
]
