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


CORPUS = [
    "a photo of a sneaker",
    "here is a bag and next to it an ankle boot",
    "a red circle on a white background",
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld, 🙂 emoji and ünïcode",
] * 20


def tiny_tokenizer(**special_tokens):
    from chameleon_fusion import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1, special_tokens=special_tokens, show_progress=False)


def tiny_vq(seed: int = 0, resolution: int = 16):
    from chameleon_fusion import ChameleonFusionVQVAE, ChameleonFusionVQVAEConfig

    torch.manual_seed(seed)
    config = ChameleonFusionVQVAEConfig(
        resolution=resolution, channel_multiplier=[1, 2, 2], base_channels=32, latent_channels=16, embed_dim=16,
        codebook_size=32, num_res_blocks=1,
    )
    return ChameleonFusionVQVAE(config).eval()


def tiny_processor(**kwargs):
    from chameleon_fusion import ChameleonFusionImageProcessor, ChameleonFusionProcessor

    vq = kwargs.pop("vq_model", None) or tiny_vq()
    image_processor = ChameleonFusionImageProcessor(size=vq.config.resolution)
    return ChameleonFusionProcessor(image_processor, kwargs.pop("tokenizer", None) or tiny_tokenizer(), vq_model=vq, **kwargs)
