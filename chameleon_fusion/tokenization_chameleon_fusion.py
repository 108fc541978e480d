"""The text tokenizer: a byte-level BPE trained with `tokenizers`, special tokens appended after the text ids."""

from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# name of the tokenizer attribute -> its default token; converted Chameleon uses <racm3:break> and <eoss>
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "image_token": "<image>",
    "boi_token": "<boi>",
    "eoi_token": "<eoi>",
}
_STANDARD = ("bos_token", "eos_token", "pad_token")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    special_tokens: dict[str, str] | None = None,
    show_progress: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; bos/eos/pad/<image>/<boi>/<eoi> get the ids right after the BPE vocabulary."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + one merge), got {vocab_size}")
    specials = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
    unknown = set(specials) - set(DEFAULT_SPECIAL_TOKENS)
    if unknown:
        raise ValueError(f"special_tokens has unknown names {sorted(unknown)}; known: {sorted(DEFAULT_SPECIAL_TOKENS)}")
    if len(set(specials.values())) != len(specials):
        raise ValueError(f"special_tokens must be distinct strings, got {specials}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_non_empty(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{name: specials[name] for name in _STANDARD},
        extra_special_tokens={name: token for name, token in specials.items() if name not in _STANDARD},
        clean_up_tokenization_spaces=False,
    )


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    count = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must yield str, got {type(text).__name__}")
        if text:
            count += 1
            yield text
    if count == 0:
        raise ValueError("texts is empty: nothing to train the tokenizer on")


def token_id(tokenizer, token: str, role: str) -> int:
    """The id of `token` in `tokenizer`, or a ValueError naming the role it was meant to play."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(ids[0]) != token:
        raise ValueError(f"the tokenizer has no token {token!r} (the {role}); add it or pass the right name")
    return ids[0]
