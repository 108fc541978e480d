"""The judge: a small CNN trained on REAL Fashion-MNIST training images, used only to grade generated images."""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..fashion_mnist import load_fashion_mnist

JUDGE_FILE, JUDGE_CONFIG = "judge.safetensors", "judge.json"


class FashionJudge(nn.Module):
    """Two conv blocks and a linear head over 32x32 grayscale images in [-1, 1]."""

    def __init__(self, resolution: int = 32, width: int = 32):
        super().__init__()
        self.resolution, self.width = resolution, width
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * (resolution // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))

    @torch.inference_mode()
    def predict(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 500) -> np.ndarray:
        """Class index per image (PIL images of any mode and size, or a (N, 1, H, W) tensor in [-1, 1])."""
        self.eval()
        pixels = images if isinstance(images, torch.Tensor) else self.to_pixels(images)
        return torch.cat([self(chunk).argmax(1) for chunk in pixels.split(batch_size)]).numpy()

    def to_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        size = (self.resolution, self.resolution)
        arrays = [np.asarray(image.convert("L").resize(size, Image.BICUBIC), dtype=np.float32) for image in images]
        return torch.from_numpy(np.stack(arrays))[:, None] / 127.5 - 1

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), folder / JUDGE_FILE)
        (folder / JUDGE_CONFIG).write_text(json.dumps({"resolution": self.resolution, "width": self.width}))

    @classmethod
    def load(cls, folder) -> "FashionJudge":
        folder = Path(folder)
        if not (folder / JUDGE_FILE).exists():
            raise FileNotFoundError(f"no judge ({JUDGE_FILE}) in {folder}; `chameleon-fusion recipe fashion` trains one")
        judge = cls(**json.loads((folder / JUDGE_CONFIG).read_text()))
        judge.load_state_dict(load_file(folder / JUDGE_FILE))
        return judge.eval()


def fashion_pixels(split: str, resolution: int = 32, root=None, limit: int | None = None):
    """Real Fashion-MNIST images resized as the image processor does (bicubic), in [-1, 1], with labels."""
    images, labels = load_fashion_mnist(split, root)
    images, labels = images[:limit], labels[:limit]
    judge = FashionJudge(resolution)
    return judge.to_pixels([Image.fromarray(image) for image in images]), torch.from_numpy(labels.astype(np.int64))


def train_judge(epochs: int = 3, batch_size: int = 128, seed: int = 0, root=None, limit: int | None = None,
                resolution: int = 32) -> tuple[FashionJudge, float]:
    """Train on the real training split; returns the judge and its accuracy on the real test split."""
    torch.manual_seed(seed)
    pixels, labels = fashion_pixels("train", resolution, root, limit)
    judge = FashionJudge(resolution)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(pixels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1))
    progress = tqdm(total=steps, desc="training the judge", unit="step")
    for _ in range(epochs):
        judge.train()
        order = torch.randperm(len(pixels))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[start : start + batch_size]
            shifted = _random_shift(pixels[batch])
            loss = F.cross_entropy(judge(shifted), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    progress.close()
    test_pixels, test_labels = fashion_pixels("test", resolution, root, limit)
    accuracy = float((judge.predict(test_pixels) == test_labels.numpy()).mean())
    return judge, accuracy


def _random_shift(pixels: torch.Tensor, most: int = 2) -> torch.Tensor:
    """Shift a batch by up to `most` pixels (filled with background), so the judge does not key on position."""
    dx, dy = (int(v) for v in torch.randint(-most, most + 1, (2,)))
    return torch.roll(F.pad(pixels, (most,) * 4, value=-1.0), shifts=(dy, dx), dims=(2, 3))[..., most:-most, most:-most]
