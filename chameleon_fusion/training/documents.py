"""Multimodal documents -> a tokenized `datasets.Dataset`: JSONL or a `datasets` table in, input_ids out.

A document is a list of segments, each `{"text": "..."}` or `{"image": "path.png"}`; a JSONL file holds one
per line as `{"segments": [...]}`, or a prompt/answer pair as `{"prompt": [...], "answer": [...]}`. Image
paths in a JSONL file are relative to the file. Tokenized rows have `input_ids` (bos + document + eos) and
`prompt_length` (tokens before the answer; 0 for a plain document).
"""

import hashlib
import json
import os
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

SEGMENT = {"text": datasets.Value("string"), "image": datasets.Value("string")}
DOCUMENT_FEATURES = datasets.Features(
    {
        "prompt": datasets.List(SEGMENT),
        "segments": datasets.List(SEGMENT),
        "source": datasets.Value("string"),
        "line": datasets.Value("int64"),
    }
)
MODALITIES = ("text", "interleaved")


# --- reading ------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike, cache_dir: str | None = None) -> datasets.Dataset:
    """A JSONL file of documents -> a Dataset (prompt, segments, source, line); image paths become absolute.

    Every line is checked first: bad JSON, a bad segment or a missing image file is an error naming the
    file and the line. The result is cached by datasets, keyed on the file's content and the images' sizes
    and modification times.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {path}")
    digest = hashlib.sha256(path.read_bytes())
    count = 0
    for row in _parse_jsonl(path):
        count += 1
        _add_images(digest, row)
    if not count:
        raise ValueError(f"{path} holds no documents")
    return datasets.Dataset.from_generator(
        _parse_jsonl, features=DOCUMENT_FEATURES, cache_dir=cache_dir,
        gen_kwargs={"path": path.resolve(), "digest": digest.hexdigest()},
    )


def _parse_jsonl(path: Path, digest: str | None = None):
    """Rows of a JSONL file; `digest` (of its content and images) only keys datasets' cache."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            yield _document_row(record, path.parent, where) | {"source": str(path), "line": number}


def _document_row(record, folder: Path, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a document must be a JSON object, got {type(record).__name__}")
    if "segments" in record and "answer" not in record and "prompt" not in record:
        prompt, segments = [], record["segments"]
    elif "answer" in record and "prompt" in record and "segments" not in record:
        prompt, segments = record["prompt"], record["answer"]
    else:
        raise ValueError(f"{where}: a document needs 'segments', or 'prompt' and 'answer'; got keys {sorted(record)}")
    return {"prompt": _segments(prompt, folder, where), "segments": _segments(segments, folder, where)}


def _segments(segments, folder: Path, where: str) -> list[dict]:
    if not isinstance(segments, list):
        raise ValueError(f"{where}: segments must be a list, got {type(segments).__name__}")
    checked = []
    for segment in segments:
        if not isinstance(segment, dict) or len(segment) != 1 or next(iter(segment)) not in ("text", "image"):
            raise ValueError(f"{where}: each segment must be {{'text': str}} or {{'image': path}}, got {segment!r}")
        kind, value = next(iter(segment.items()))
        if not isinstance(value, str):
            raise ValueError(f"{where}: the {kind} of a segment must be a string, got {type(value).__name__}")
        if kind == "image":
            image_path = (folder / value).resolve()
            if not image_path.is_file():
                raise FileNotFoundError(f"{where}: image file not found: {image_path}")
            checked.append({"text": None, "image": str(image_path)})
        else:
            checked.append({"text": value, "image": None})
    return checked


def _add_images(digest, row: dict) -> None:
    """Fold every image's path, size and modification time into the digest: an edited image is a new dataset."""
    for segment in row["prompt"] + row["segments"]:
        if segment["image"]:
            stat = os.stat(segment["image"])
            digest.update(f"{segment['image']}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def load_documents(name_or_path: str, split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """Documents from a `.jsonl` file, or a `datasets` table (hub name or local folder) with the same columns."""
    if str(name_or_path).endswith(".jsonl"):
        return read_jsonl(name_or_path, cache_dir=cache_dir)
    from .sources import load_table

    table = load_table(name_or_path, split)
    if "segments" not in table.column_names and "answer" not in table.column_names:
        raise ValueError(
            f"documents need a 'segments' column (or 'prompt' and 'answer'); {name_or_path} has {table.column_names}"
        )
    return table


# --- tokenizing ---------------------------------------------------------------------------------------------


def tokenize_documents(
    documents: datasets.Dataset,
    processor,
    max_length: int | None = None,
    pack: bool = False,
    image_root: str | None = None,
    batch_size: int = 64,
    add_eos: bool = True,
) -> datasets.Dataset:
    """Documents -> rows of input_ids and prompt_length, images VQ-encoded in batches of `batch_size` documents.

    `max_length` truncates each document (never inside an image), or with `pack=True` is the length of the
    rows that consecutive documents are packed into. Image entries may be paths (absolute, or relative to
    `image_root`), PIL images, or `datasets.Image` dicts. Results are cached by datasets' fingerprinting.
    """
    if not isinstance(documents, datasets.Dataset):
        raise TypeError(f"documents must be a datasets.Dataset, got {type(documents).__name__}")
    if max_length is not None and max_length < processor.vocabulary.image_seq_length + 2:
        raise ValueError(
            f"max_length ({max_length}) must hold one image: at least image_seq_length + 2 = "
            f"{processor.vocabulary.image_seq_length + 2}"
        )
    if pack and max_length is None:
        raise ValueError("pack=True needs max_length, the length of the packed rows")
    tokenized = documents.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=documents.column_names,
        fn_kwargs={
            "processor": processor,
            "image_root": image_root,
            "max_length": None if pack else max_length,
            "add_eos": add_eos,
        },
        desc="Tokenizing documents",
    )
    if not pack:
        return tokenized
    vocabulary = processor.vocabulary
    return tokenized.map(
        _pack_batch,
        batched=True,
        batch_size=1000,
        remove_columns=tokenized.column_names,
        fn_kwargs={"max_length": max_length, "boi": vocabulary.boi_token_id, "eoi": vocabulary.eoi_token_id},
        desc="Packing",
    )


def _tokenize_batch(batch, indices, processor, image_root, max_length, add_eos):
    count = len(indices)
    prompts = batch.get("prompt") or [[] for _ in range(count)]
    answers = batch["segments"] if "segments" in batch else batch["answer"]
    places = [_where(batch, i, index) for i, index in enumerate(indices)]
    parts = [_parts(p, image_root, where) for p, where in zip(prompts, places)]
    parts += [_parts(a, image_root, where) for a, where in zip(answers, places)]
    ids = processor(documents=parts, add_bos=False)["input_ids"]
    vocabulary = processor.vocabulary
    head = [vocabulary.bos_token_id] if vocabulary.bos_token_id is not None else []
    tail = vocabulary.eos_token_ids[:1] if add_eos else []
    rows = {"input_ids": [], "prompt_length": []}
    for prompt_ids, answer_ids in zip(ids[:count], ids[count:]):
        sequence = head + prompt_ids + answer_ids + tail
        if max_length is not None:
            sequence = processor.truncate(sequence, max_length)
        rows["input_ids"].append(sequence)
        rows["prompt_length"].append(min(len(head) + len(prompt_ids), len(sequence)) if prompt_ids else 0)
    return rows


def _where(batch, position: int, index: int) -> str:
    if "source" in batch and "line" in batch:
        return f"{batch['source'][position]}:{batch['line'][position]}"
    return f"row {index}"


def _parts(segments, image_root, where: str) -> list:
    """Segments -> the processor's document form, a list of str and PIL images."""
    parts = []
    for segment in segments or []:
        image, text = segment.get("image"), segment.get("text")
        if image is not None:
            parts.append(_open_image(image, image_root, where))
        elif text is not None:
            parts.append(text)
    return parts


def _open_image(image, image_root, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):  # an undecoded datasets.Image
        if image.get("bytes"):
            import io

            return Image.open(io.BytesIO(image["bytes"]))
        image = image.get("path")
    if not isinstance(image, str):
        raise TypeError(f"{where}: an image must be a path, a PIL image or a datasets.Image dict, got {type(image).__name__}")
    path = Path(image_root or ".") / image if not os.path.isabs(image) else Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    with Image.open(path) as opened:
        opened.load()
        return opened


# --- packing ------------------------------------------------------------------------------------------------


def pack_sequences(sequences, max_length: int, boi_token_id: int, eoi_token_id: int) -> list[list[int]]:
    """Concatenate sequences and cut into rows of at most max_length, never inside a `<boi>`...`<eoi>` image.

    A cut that would split an image moves to before its `<boi>`, leaving that row short.
    """
    rows, buffer = [], []
    for sequence in sequences:
        buffer.extend(sequence)
        while len(buffer) > max_length:
            cut = _cut_before_image(buffer, max_length, boi_token_id, eoi_token_id)
            rows.append(buffer[:cut])
            buffer = buffer[cut:]
    if buffer:
        rows.append(buffer)
    return rows


def _cut_before_image(ids: list[int], max_length: int, boi: int, eoi: int) -> int:
    window = ids[:max_length]
    last_boi = len(window) - 1 - window[::-1].index(boi) if boi in window else None
    if last_boi is None or eoi in window[last_boi:]:
        return max_length
    if last_boi == 0:
        raise ValueError(f"an image segment is longer than max_length ({max_length}); it cannot be packed")
    return last_boi


def _pack_batch(batch, max_length, boi, eoi):
    if any(batch["prompt_length"]):
        raise ValueError("packing joins documents; prompt/answer rows need pack=False to keep their prompts")
    rows = pack_sequences(batch["input_ids"], max_length, boi, eoi)
    return {"input_ids": rows, "prompt_length": [0] * len(rows)}


# --- modality schedule --------------------------------------------------------------------------------------


def modality_ramp(
    tokenized: datasets.Dataset,
    vocabulary,
    start: dict[str, float],
    end: dict[str, float],
    num_rows: int,
    seed: int = 0,
) -> datasets.Dataset:
    """Rows ordered so that the modality mix moves linearly from `start` to `end` weights over `num_rows` rows.

    Modalities are "text" (rows without an image) and "interleaved" (rows with one), e.g. start={"text": 0.8,
    "interleaved": 0.2}, end={"text": 0.2, "interleaved": 0.8}: more text early, more interleaved later.
    Rows of a modality are drawn without replacement, reshuffled once used up. Train on the result in order
    (`TrainingArguments(train_sampling_strategy="sequential")`).
    """
    start_weights, end_weights = _weights(start, "start"), _weights(end, "end")
    if num_rows < 1:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    boi = vocabulary.boi_token_id
    has_image = np.array(
        tokenized.map(
            lambda batch: {"has_image": [boi in ids for ids in batch["input_ids"]]},
            batched=True,
            remove_columns=tokenized.column_names,
            desc="Finding modalities",
        )["has_image"],
        dtype=bool,
    )
    pools = {"text": np.flatnonzero(~has_image), "interleaved": np.flatnonzero(has_image)}
    for name in MODALITIES:
        if len(pools[name]) == 0 and (start_weights[name] > 0 or end_weights[name] > 0):
            raise ValueError(f"the schedule asks for {name} rows but the dataset has none")
    rng = np.random.default_rng(seed)
    progress = np.linspace(0.0, 1.0, num_rows)[:, None]
    weights = (1 - progress) * np.array([start_weights[m] for m in MODALITIES]) + progress * np.array(
        [end_weights[m] for m in MODALITIES]
    )
    share_of_text = weights[:, 0] / weights.sum(axis=1)
    picks_text = rng.random(num_rows) < share_of_text
    indices = np.empty(num_rows, dtype=np.int64)
    for name, chosen in (("text", picks_text), ("interleaved", ~picks_text)):
        indices[chosen] = _draw(pools[name], int(chosen.sum()), rng)
    return tokenized.select(indices)


def _weights(weights: dict[str, float], name: str) -> dict[str, float]:
    if not isinstance(weights, dict) or set(weights) - set(MODALITIES):
        raise ValueError(f"{name} must map modalities {MODALITIES} to weights, got {weights!r}")
    full = {m: float(weights.get(m, 0.0)) for m in MODALITIES}
    if min(full.values()) < 0 or sum(full.values()) <= 0:
        raise ValueError(f"{name} weights must be non-negative with a positive sum, got {weights!r}")
    return full


def _draw(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=np.int64)
    rounds = -(-count // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:count]


def parse_weights(text: str) -> dict[str, float]:
    """'text=0.8,interleaved=0.2' -> {'text': 0.8, 'interleaved': 0.2}."""
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"modality weights look like 'text=0.8,interleaved=0.2', got {text!r}") from None
    return weights
