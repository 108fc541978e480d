"""Run the demo: build a tiny early-fusion model, save it, reload it through the Auto classes, generate."""

import tempfile

import torch
from transformers import AutoModelForCausalLM

from .configuration_chameleon_fusion import ChameleonFusionConfig
from .modeling_chameleon_fusion import ChameleonFusionForConditionalGeneration


def add_arguments(parser):
    parser.add_argument("--new-tokens", type=int, default=12, help="how many tokens to generate")
    parser.add_argument("--seed", type=int, default=0)


def run(args):
    torch.manual_seed(args.seed)
    config = ChameleonFusionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        text_vocab_size=256, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        boi_token_id=259, eoi_token_id=260, image_token_id=261, image_codebook_size=64, image_seq_length=16,
    )
    model = ChameleonFusionForConditionalGeneration(config)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([[config.bos_token_id, 72, 105]])
    output = reloaded.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    print(f"{type(reloaded).__name__} ({sum(p.numel() for p in reloaded.parameters()):,} parameters, random weights)")
    print("prompt ids:   ", prompt[0].tolist())
    print("generated ids:", output[0, prompt.shape[1]:].tolist())
