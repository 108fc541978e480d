"""The `chameleon-fusion` command (also `python -m chameleon_fusion`)."""

import argparse
import importlib
import sys

# subcommand -> module holding `add_arguments(parser)` and `run(args)`; the module docstring is its help.
COMMANDS = {
    "demo": "chameleon_fusion.demo",
    "recipe": "chameleon_fusion.fashion.recipe",
    "eval": "chameleon_fusion.fashion.evaluate",
    "convert": "chameleon_fusion.convert.command",
    "train-tokenizer": "chameleon_fusion.training.tokenizer",
    "train-vq": "chameleon_fusion.training.vq",
    "train": "chameleon_fusion.training.train",
    "generate": "chameleon_fusion.generate_cli",
    "publish": "chameleon_fusion.publish",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chameleon-fusion",
        description="Early-fusion (Chameleon-style) multimodal models on the Hugging Face stack.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        help_line = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None
        sub = subparsers.add_parser(name, help=help_line, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
