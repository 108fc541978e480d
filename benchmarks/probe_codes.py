"""How much class information a VQ tokenizer's codes carry: classifiers trained on the codes of Fashion-MNIST's 60k
training images, scored on the 10k test images. A ceiling for captioning from those codes at a given model size.

    python benchmarks/probe_codes.py --vq runs/fashion/vq                   # linear and MLP probes (minutes)
    python benchmarks/probe_codes.py --vq runs/fashion/vq --transformer 6   # + a decoder-sized transformer, 6 epochs

Linear: one weight vector per (position, code); MLP: a 256-wide hidden layer over the same one-hot input;
transformer: 4 layers of 128 (the recipe's decoder shape) over the code sequence with a class token.
"""

import argparse
import time

import torch
from PIL import Image
from torch import nn

from chameleon_fusion.fashion_mnist import load_fashion_mnist
from chameleon_fusion.image_processing_chameleon_fusion import ChameleonFusionImageProcessor
from chameleon_fusion.modeling_vqvae import ChameleonFusionVQVAE


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vq", required=True, help="a saved ChameleonFusionVQVAE folder")
    parser.add_argument("--transformer", type=int, default=0, metavar="EPOCHS", help="also the transformer probe")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


@torch.no_grad()
def encode_split(vq, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (images x positions) and labels of one Fashion-MNIST split."""
    images, labels = load_fashion_mnist(split)
    to_pixels = ChameleonFusionImageProcessor(size=vq.config.resolution)
    codes = [
        vq.encode(to_pixels([Image.fromarray(image) for image in images[start : start + 1000]])["pixel_values"])
        for start in range(0, len(images), 1000)
    ]
    return torch.cat([c.reshape(len(c), -1) for c in codes]), torch.as_tensor(labels).long()


class BagOfCodes(nn.Module):
    """A sum of one learned vector per (position, code), then an optional hidden layer."""

    def __init__(self, positions: int, codebook: int, hidden: int | None):
        super().__init__()
        self.register_buffer("offsets", torch.arange(positions) * codebook)
        self.bag = nn.EmbeddingBag(positions * codebook, hidden or 10, mode="sum")
        self.head = nn.Sequential(nn.GELU(), nn.Dropout(0.3), nn.Linear(hidden, 10)) if hidden else nn.Identity()

    def forward(self, codes):
        return self.head(self.bag(codes + self.offsets))


class CodeTransformer(nn.Module):
    """A class token and the code sequence through a pre-norm transformer encoder of the recipe decoder's size."""

    def __init__(self, positions: int, codebook: int, width=128, layers=4, heads=2, intermediate=352):
        super().__init__()
        self.embed = nn.Embedding(codebook, width)
        self.position = nn.Parameter(torch.randn(positions + 1, width) * 0.02)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, heads, intermediate, 0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, codes):
        tokens = torch.cat([self.class_token.expand(len(codes), -1, -1), self.embed(codes)], dim=1)
        return self.head(self.encoder(tokens + self.position)[:, 0])


def test_accuracy(model, train, test, epochs: int, lr: float, weight_decay: float = 0.0) -> float:
    """Train with AdamW and a one-cycle schedule (batches of 256), return the accuracy on the test split."""
    (x, y), (x_test, y_test) = train, test
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(x) // 256
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for step in range(steps_per_epoch):
            batch = order[step * 256 : (step + 1) * 256]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(-1) == y_test).float().mean().item()


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    vq = ChameleonFusionVQVAE.from_pretrained(args.vq).eval()
    train, test = encode_split(vq, "train"), encode_split(vq, "test")
    positions, codebook = train[0].shape[1], vq.config.codebook_size
    print(f"# probe_codes  {args.vq}: {positions} codes per image from {codebook}; 60000 train / 10000 test images")
    probes = {
        "linear": lambda: test_accuracy(BagOfCodes(positions, codebook, None), train, test, 10, 3e-2),
        "MLP (256 hidden)": lambda: test_accuracy(BagOfCodes(positions, codebook, 256), train, test, 15, 3e-3, 0.05),
    }
    if args.transformer:
        probes["transformer (128 x 4)"] = lambda: test_accuracy(
            CodeTransformer(positions, codebook), train, test, args.transformer, 2e-3, 0.05
        )
    for name, probe in probes.items():
        start = time.perf_counter()
        accuracy = probe()
        print(f"{name}: test accuracy {100 * accuracy:.1f}% ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
