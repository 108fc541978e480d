"""Convert checkpoints: transformers' Chameleon or Meta's Chameleon/Anole release to ours, and ours back to transformers."""

from pathlib import Path


def add_arguments(parser):
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source_format", choices=["transformers", "meta"],
                           help="convert a transformers Chameleon folder or a Meta-layout release into ours")
    direction.add_argument("--to", dest="target_format", choices=["transformers"],
                           help="convert one of our checkpoints into transformers' Chameleon format")
    parser.add_argument("source", type=Path, help="the checkpoint folder to read")
    parser.add_argument("destination", type=Path, help="the folder to write")


def run(args):
    from .hf_chameleon import convert_from_transformers, convert_to_transformers
    from .meta_chameleon import convert_from_meta

    if not args.source.is_dir():
        raise FileNotFoundError(f"source folder {args.source} does not exist")
    if args.destination.exists() and any(args.destination.iterdir()):
        raise FileExistsError(f"destination {args.destination} is not empty; choose a new folder")
    if args.target_format == "transformers":
        convert_to_transformers(args.source, args.destination)
        print(f"wrote transformers' ChameleonForConditionalGeneration to {args.destination}")
        return 0
    convert = convert_from_transformers if args.source_format == "transformers" else convert_from_meta
    model, processor = convert(args.source, args.destination)
    drawable = processor.vq_model.config.decoder_trained
    print(f"wrote {type(model).__name__} ({model.num_parameters():,} parameters) and its processor to "
          f"{args.destination}; image decoder: {'trained' if drawable else 'UNTRAINED (supply one to draw)'}")
    return 0
