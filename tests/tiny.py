"""Tiny configs shared by the tests: every layout field set, sizes small enough for CPU."""

import torch

from chameleon_fusion import ChameleonFusionConfig, ChameleonFusionForConditionalGeneration

TEXT_VOCAB = 100
BOS, EOS, PAD, BOI, EOI, IMAGE = 100, 101, 102, 103, 104, 105
IMAGE_OFFSET, CODEBOOK = 106, 32


def tiny_config(**overrides) -> ChameleonFusionConfig:
    fields = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        text_vocab_size=TEXT_VOCAB,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        image_token_id=IMAGE,
        image_codebook_size=CODEBOOK,
        image_seq_length=4,
    )
    fields.update(overrides)
    return ChameleonFusionConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> ChameleonFusionForConditionalGeneration:
    torch.manual_seed(seed)
    return ChameleonFusionForConditionalGeneration(tiny_config(**overrides)).eval()


def random_ids(batch: int, length: int, seed: int = 0, high: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high or IMAGE_OFFSET + CODEBOOK, (batch, length), generator=generator)
