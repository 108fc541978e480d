"""Train the text tokenizer: a byte-level BPE on text files or a `datasets` column, saved for AutoTokenizer."""

from itertools import chain
from pathlib import Path

from ..tokenization_chameleon_fusion import DEFAULT_SPECIAL_TOKENS, train_bpe_tokenizer
from .sources import load_table, require_column


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--files", nargs="+", type=Path, help="text files; each line is one text")
    source.add_argument("--dataset", help="a `datasets` name or local path (load_dataset)")
    parser.add_argument("--split", default="train", help="dataset split (with --dataset)")
    parser.add_argument("--column", default="text", help="dataset text column (with --dataset)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size, before special tokens")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="folder to save the tokenizer in")
    for name, token in DEFAULT_SPECIAL_TOKENS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, default=token, help=f"the {name.replace('_', ' ')} (default {token})")


def run(args):
    tokenizer = train_bpe_tokenizer(
        read_texts(args),
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens={name: getattr(args, name) for name in DEFAULT_SPECIAL_TOKENS},
    )
    tokenizer.save_pretrained(args.out)
    print(f"saved a {len(tokenizer)}-token tokenizer ({tokenizer.vocab_size} BPE + specials) to {args.out}")


def read_texts(args):
    """The training texts, streamed: lines of the files, or one column of a dataset split."""
    if args.files:
        missing = [str(path) for path in args.files if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"--files: no such file(s): {', '.join(missing)}")
        return chain.from_iterable(_lines(path) for path in args.files)
    dataset = load_table(args.dataset, args.split)
    require_column(dataset, args.column, "--column")
    return (row[args.column] for row in dataset)


def _lines(path: Path):
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            yield line.rstrip("\n")
