"""Shared by the benchmarks: a decoder config laid out like Chameleon's (text ids, 6 special ids, image codes)."""

SPECIALS = 6  # bos, eos, pad, <boi>, <eoi>, <image>, right after the text ids


def contiguous_layout(text_vocab: int, codebook: int, image_seq_length: int = 1024) -> dict:
    """ChameleonFusionConfig layout fields: the special ids after the text ids, then the image codes."""
    return dict(
        text_vocab_size=text_vocab,
        bos_token_id=text_vocab,
        eos_token_id=text_vocab + 1,
        pad_token_id=text_vocab + 2,
        boi_token_id=text_vocab + 3,
        eoi_token_id=text_vocab + 4,
        image_token_id=text_vocab + 5,
        image_codebook_size=codebook,
        image_token_offset=text_vocab + SPECIALS,
        image_seq_length=image_seq_length,
    )


def decoder_sizes(args) -> dict:
    """The size flags every decoder benchmark takes (--hidden, --intermediate, --layers, --heads, --kv-heads)."""
    return dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
    )
