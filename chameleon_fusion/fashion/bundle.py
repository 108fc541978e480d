"""The bundled default model: where it lives in the package, and loading any recipe output the same way."""

import json
from pathlib import Path

import torch

from ..modeling_chameleon_fusion import ChameleonFusionForConditionalGeneration
from ..processing_chameleon_fusion import ChameleonFusionProcessor
from .judge import FashionJudge

BUNDLED = Path(__file__).parent / "bundled"
METRICS_FILE = "metrics.json"


def load_bundle(folder=None):
    """(model, processor, judge, folder) of a recipe output; the bundled default when `folder` is None."""
    folder = Path(folder) if folder is not None else BUNDLED
    if not (folder / "config.json").exists():
        hint = ("the bundled model is missing from this installation; rebuild it with "
                "`chameleon-fusion recipe fashion`") if folder == BUNDLED else "train one with `chameleon-fusion recipe fashion`"
        raise FileNotFoundError(f"no model in {folder}: {hint}")
    model = ChameleonFusionForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = ChameleonFusionProcessor.from_pretrained(folder)
    processor.check_model(model)
    return model, processor, FashionJudge.load(folder), folder


def read_metrics(folder=None) -> dict:
    path = Path(folder or BUNDLED) / METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else {}
