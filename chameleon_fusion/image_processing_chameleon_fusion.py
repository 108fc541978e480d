"""Pixels in and out: any PIL mode, numpy or torch image -> RGB square at the tokenizer resolution in [-1, 1], and back."""

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

RESIZE_MODES = ("crop", "pad")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


class ChameleonFusionImageProcessor(BaseImageProcessor):
    """Make any image the square RGB (or gray) tensor the VQ-VAE reads: resize shorter side + center crop, or pad."""

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 512, resize_mode: str = "crop", resample: str = "bicubic",
                 background: tuple[int, int, int] = (255, 255, 255), num_channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
        self.size, self.resize_mode, self.resample = int(size), resize_mode, resample
        self.background, self.num_channels = tuple(background), num_channels

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors)

    def preprocess(self, images, return_tensors: str | None = "pt") -> BatchFeature:
        """One image or a list of them -> BatchFeature(pixel_values=(batch, channels, size, size) in [-1, 1])."""
        images = split_batch(images)
        arrays = [self.to_array(self.to_square(self.to_rgb(image, index)), index) for index, image in enumerate(images)]
        pixel_values = np.stack(arrays) if arrays else np.zeros((0, self.num_channels, self.size, self.size), np.float32)
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def to_rgb(self, image, index: int = 0) -> Image.Image:
        """Any supported input as an RGB PIL image; transparency is composited on `background`."""
        if isinstance(image, torch.Tensor):
            image = tensor_to_hwc(image, index)
        if isinstance(image, np.ndarray):
            image = array_to_pil(image, index)
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {index} must be a PIL.Image, numpy array or torch tensor, got {type(image).__name__}")
        try:
            image.load()
        except OSError as error:
            raise ValueError(f"image {index} cannot be read (corrupt or truncated file): {error}") from error
        return pil_to_rgb(image, self.background, index)

    def to_square(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side to `size` and center crop, or resize the longer side and pad."""
        width, height = image.size
        resample = _RESAMPLE[self.resample]
        if self.resize_mode == "crop":
            scale = self.size / min(width, height)
            new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
            image = image.resize(new_size, resample)
            left, top = (new_size[0] - self.size) // 2, (new_size[1] - self.size) // 2
            return image.crop((left, top, left + self.size, top + self.size))
        scale = self.size / max(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", (self.size, self.size), self.background)
        canvas.paste(image.resize(new_size, resample), ((self.size - new_size[0]) // 2, (self.size - new_size[1]) // 2))
        return canvas

    def to_array(self, image: Image.Image, index: int = 0) -> np.ndarray:
        """(channels, size, size) float32 in [-1, 1]."""
        if self.num_channels == 1:
            image = image.convert("L")
        array = np.asarray(image, dtype=np.float32).reshape(image.size[1], image.size[0], -1)
        return array.transpose(2, 0, 1) / 127.5 - 1.0

    def postprocess(self, pixel_values: torch.Tensor) -> list[Image.Image]:
        """(batch, channels, H, W) in [-1, 1] -> PIL images."""
        pixel_values = torch.as_tensor(pixel_values)
        if pixel_values.dim() == 3:
            pixel_values = pixel_values.unsqueeze(0)
        if pixel_values.dim() != 4 or pixel_values.shape[1] not in (1, 3):
            raise ValueError(f"pixel_values must be (batch, 1 or 3, H, W), got {tuple(pixel_values.shape)}")
        pixels = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p, "L" if p.shape[-1] == 1 else "RGB") for p in pixels]


def split_batch(images) -> list:
    """A single image, a list of images, or a 4D array/tensor -> a list of single images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def tensor_to_hwc(image: torch.Tensor, index: int) -> np.ndarray:
    """A channels-first (C, H, W) or (H, W) tensor -> an (H, W, C) or (H, W) numpy array."""
    array = image.detach().cpu()
    array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    return array


def array_to_pil(array: np.ndarray, index: int) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) array; uint8, uint16, bool or float in [0, 1] -> PIL image."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image {index} must be (H, W), (H, W, 1|3|4) or (1|3|4, H, W), got shape {array.shape}")
    if min(array.shape[:2]) == 0:
        raise ValueError(f"image {index} is empty (shape {array.shape})")
    array = to_uint8(array, index)
    return Image.fromarray(array, "L" if array.ndim == 2 else "RGB" if array.shape[-1] == 3 else "RGBA")


def to_uint8(array: np.ndarray, index: int) -> np.ndarray:
    """Scale an image array to uint8: 16-bit by /257, floats as [0, 1] (or [0, 255] when above 1)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"image {index} has NaN or infinite pixel values")
        scale = 255.0 if array.max() <= 1.0 else 1.0
        return (array.astype(np.float32) * scale).clip(0, 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array.clip(0, 255).astype(np.uint8)
    raise TypeError(f"image {index} has unsupported dtype {array.dtype}")


def pil_to_rgb(image: Image.Image, background: tuple[int, int, int], index: int = 0) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on `background`, 16/32-bit and float modes scaled to 8 bit."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index} is empty ({image.width}x{image.height})")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image)
        if mode != "F":
            array = array.astype(np.float32) / (65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0)
        return Image.fromarray(to_uint8(array, index), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"image {index} has PIL mode {mode!r}, which cannot be converted to RGB") from error


__all__ = ["ChameleonFusionImageProcessor"]
