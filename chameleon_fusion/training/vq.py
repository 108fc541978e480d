"""Train a VQ-VAE image tokenizer on an image folder, a `datasets` Image column, or Fashion-MNIST.

Runs under accelerate: one process, `accelerate launch` on GPUs, or `torchrun --nproc_per_node N` with
`--cpu` for N CPU processes. Logs PSNR, codebook utilization and perplexity, resumes exactly from
`OUTPUT_DIR/checkpoint`, and saves the tokenizer with `save_pretrained`. The defaults are the Fashion-MNIST
recipe (32 px, 8x8 codes from 256; see benchmarks/RESULTS.md).
"""

import argparse
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..configuration_chameleon_fusion import ChameleonFusionVQVAEConfig
from ..fashion_mnist import load_fashion_mnist
from ..modeling_vqvae import ChameleonFusionVQVAE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CHECKPOINT_DIR = "checkpoint"


def add_arguments(parser: argparse.ArgumentParser):
    data = parser.add_argument_group("data (pick one source)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--fashion-mnist", action="store_true", help="Fashion-MNIST train split (test split for eval)")
    source.add_argument("--image-folder", help="a folder of images, searched recursively")
    source.add_argument("--dataset", help="a `datasets` name or local path with an Image column")
    data.add_argument("--image-column", default="image")
    data.add_argument("--label-column", default="label", help="a dataset's class column (for --label-loss-weight)")
    data.add_argument("--split", default="train")
    data.add_argument("--fashion-mnist-root", help="folder of the idx.gz files (default: Debian's)")
    data.add_argument("--eval-images", type=int, default=500, help="held out of a folder/dataset for eval")

    model = parser.add_argument_group("model (ignored with --init-from)")
    model.add_argument("--init-from", help="a saved tokenizer to fine-tune instead of a new one")
    model.add_argument("--resolution", type=int, default=32)
    model.add_argument("--in-channels", type=int, default=3)
    model.add_argument("--base-channels", type=int, default=32)
    model.add_argument("--channel-multiplier", type=int, nargs="+", default=[1, 2, 2])
    model.add_argument("--num-res-blocks", type=int, default=1)
    model.add_argument("--attn-resolutions", type=int, nargs="*", default=[])
    model.add_argument("--no-mid-attention", action="store_true")
    model.add_argument("--latent-channels", type=int, default=32)
    model.add_argument("--embed-dim", type=int, default=16)
    model.add_argument("--codebook-size", type=int, default=256)
    model.add_argument("--quantizer", choices=["vq", "ema", "fsq"], default="ema")
    model.add_argument("--fsq-levels", type=int, nargs="+")
    model.add_argument("--commitment-beta", type=float, default=0.25)
    model.add_argument("--ema-decay", type=float, default=0.99)
    model.add_argument("--dead-code-threshold", type=float, default=1.0)
    model.add_argument("--reconstruction-loss", choices=["l1", "l2"], default="l2")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=50)
    train.add_argument("--save-every", type=int, default=500, help="checkpoint period (steps) for --resume")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint if present")
    train.add_argument("--stop-at", type=int, help="end this run early at this step (checkpointed; see --resume)")
    train.add_argument("--num-workers", type=int, default=0)
    train.add_argument("--cpu", action="store_true",
                       help="train on CPU; with `torchrun --nproc_per_node N` that is N processes over gloo")
    train.add_argument("--gan-weight", type=float, default=0.0, help="PatchGAN term weight; 0 turns it off")
    train.add_argument("--gan-start", type=int, default=1000, help="step at which the adversarial term starts")
    train.add_argument("--label-loss-weight", type=float, default=0.0,
                       help="weight of a class term: a linear classifier on the quantized latents, trained with the "
                       "tokenizer on the images' labels (Fashion-MNIST's, or --label-column), so the codes keep "
                       "class evidence; 0 turns it off")


# -- data: every source yields uint8 (C, H, W) tensors at the training resolution ----------------------


def image_to_uint8(image: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """PIL image -> uint8 (channels, resolution, resolution): shorter side resized (bicubic), center crop."""
    image = image.convert("L" if channels == 1 else "RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, -1)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_pixel_values(images: torch.Tensor, in_channels: int) -> torch.Tensor:
    """uint8 (B, c, H, W) -> float in [-1, 1] with `in_channels` channels (grayscale is replicated)."""
    pixels = images.float() / 127.5 - 1
    return pixels.expand(-1, in_channels, -1, -1) if pixels.shape[1] == 1 else pixels


class ImageDataset(torch.utils.data.Dataset):
    """Images from files or from a `datasets` column, converted on access; with `labels`, (image, label) pairs."""

    def __init__(self, items, resolution: int, channels: int, read=lambda item: Image.open(item), labels=None):
        self.items, self.resolution, self.channels, self.read, self.labels = items, resolution, channels, read, labels

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        image = image_to_uint8(self.read(self.items[index]), self.resolution, self.channels)
        return image if self.labels is None else (image, self.labels[index])


def fashion_mnist_uint8(split: str, resolution: int, root=None) -> torch.Tensor:
    """Fashion-MNIST resized to `resolution` (PIL bicubic) as uint8 (N, 1, resolution, resolution)."""
    return _resized(load_fashion_mnist(split, root)[0], resolution)


def _resized(images: np.ndarray, resolution: int) -> torch.Tensor:
    return torch.stack([image_to_uint8(Image.fromarray(image), resolution, 1) for image in images])


def build_datasets(args, resolution: int, in_channels: int):
    """(train, eval) datasets of uint8 tensors (with class labels when --label-loss-weight asks for them); eval is
    Fashion-MNIST's test split or a held-out tail."""
    if args.fashion_mnist:
        return tuple(_fashion_mnist_split(split, resolution, args) for split in ("train", "test"))
    channels = 1 if in_channels == 1 else 3
    if args.image_folder:
        if args.label_loss_weight:
            raise ValueError("--label-loss-weight needs class labels: use --fashion-mnist, or --dataset with a "
                             "--label-column; an --image-folder has none")
        files = sorted(p for p in Path(args.image_folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {args.image_folder}")
        full = ImageDataset(files, resolution, channels)
    else:
        full = _datasets_column(args, resolution, channels)
    held_out = min(args.eval_images, len(full) // 10)
    train = torch.utils.data.Subset(full, range(len(full) - held_out))
    return train, torch.utils.data.Subset(full, range(len(full) - held_out, len(full)))


def _fashion_mnist_split(split: str, resolution: int, args) -> torch.utils.data.TensorDataset:
    """One split's images, and its labels when the class term needs them (the files are read once)."""
    images, labels = load_fashion_mnist(split, args.fashion_mnist_root)
    tensors = [_resized(images, resolution)]
    if args.label_loss_weight:
        tensors.append(torch.from_numpy(labels.astype(np.int64)))
    return torch.utils.data.TensorDataset(*tensors)


def _datasets_column(args, resolution: int, channels: int) -> ImageDataset:
    import datasets

    if Path(args.dataset).is_dir() and (Path(args.dataset) / "dataset_info.json").exists():
        table = datasets.load_from_disk(args.dataset)
        table = table[args.split] if isinstance(table, datasets.DatasetDict) else table
    else:
        table = datasets.load_dataset(args.dataset, split=args.split)
    if args.image_column not in table.column_names:
        raise ValueError(f"--image-column {args.image_column!r} not in the dataset's columns {table.column_names}")
    column = table.cast_column(args.image_column, datasets.Image())
    labels = _label_column(table, args) if args.label_loss_weight else None
    return ImageDataset(range(len(column)), resolution, channels, read=lambda i: column[i][args.image_column],
                        labels=labels)


def _label_column(table, args) -> list[int]:
    """The dataset's class labels as integers 0..n-1, checked."""
    if args.label_column not in table.column_names:
        raise ValueError(f"--label-loss-weight needs a class column: --label-column {args.label_column!r} is not "
                         f"in the dataset's columns {table.column_names}")
    labels = table[args.label_column]
    if not all(isinstance(label, int) and not isinstance(label, bool) and label >= 0 for label in labels):
        raise ValueError(f"--label-column {args.label_column!r} must hold class indices (integers >= 0)")
    return labels


def _first(sample):
    return sample[0] if isinstance(sample, (tuple, list)) else sample


class StepBatches(torch.utils.data.Sampler):
    """Batch `step` is a fixed function of (seed, step): a fresh permutation per epoch, so resuming at any
    step replays exactly the batches an uninterrupted run would have seen."""

    def __init__(self, num_items, batch_size, seed, start_step, total_steps, rank=0, world_size=1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.total_steps, self.rank, self.world_size = start_step, total_steps, rank, world_size
        self.per_epoch = num_items // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(f"{num_items} images are fewer than one batch of {batch_size * world_size}")

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one sampler per run
    def _order(self, epoch):
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self):
        return self.total_steps - self.start_step

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.per_epoch)
            start = (position * self.world_size + self.rank) * self.batch_size
            yield self._order(epoch)[start : start + self.batch_size].tolist()


# -- the optional class term -------------------------------------------------------------------------


class LabelHead(nn.Module):
    """A linear classifier over the flattened quantized latents (training only; not saved with the tokenizer)."""

    def __init__(self, config: ChameleonFusionVQVAEConfig, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(config.embed_dim * config.latent_size**2, num_classes)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.linear(quantized.flatten(1))


def count_classes(dataset) -> int:
    """1 + the largest class label of a labelled training set (a TensorDataset, an ImageDataset or a Subset)."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    labels = base.tensors[1] if isinstance(base, torch.utils.data.TensorDataset) else torch.as_tensor(base.labels)
    return int(labels.max()) + 1


# -- the optional adversarial term -------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): strided 4x4 convs, one real/fake logit per overlapping patch."""

    def __init__(self, in_channels: int, width: int = 32, layers: int = 2):
        super().__init__()
        modules = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            modules += [nn.Conv2d(channels, out, 4, stride, 1, bias=False), nn.GroupNorm(1, out), nn.LeakyReLU(0.2)]
            channels = out
        modules.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.layers = nn.Sequential(*modules)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def adaptive_gan_weight(reconstruction_loss, generator_loss, last_layer: torch.Tensor) -> torch.Tensor:
    """taming's balance: |grad of the pixel loss| / |grad of the GAN loss| at the decoder's last layer."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()


# -- metrics -----------------------------------------------------------------------------------------


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstruction.clamp(-1, 1) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


@torch.no_grad()
def evaluate_tokenizer(model: ChameleonFusionVQVAE, images: torch.Tensor, batch_size: int = 250) -> dict:
    """Round-trip metrics on uint8 images (N, c, H, W): PSNR, codebook use, and the re-encode rate."""
    model.eval()
    codebook_size = model.config.codebook_size
    image_mse, counts, same_codes = [], torch.zeros(codebook_size), 0
    for start in range(0, len(images), batch_size):
        pixels = to_pixel_values(images[start : start + batch_size], model.config.in_channels).to(model.device)
        codes = model.encode(pixels)
        decoded = model.decode(codes)
        image_mse.append((decoded - pixels).pow(2).flatten(1).mean(1).cpu())
        counts += torch.bincount(codes.flatten().cpu(), minlength=codebook_size).float()
        same_codes += (model.encode(decoded) == codes).sum().item()
    image_mse = torch.cat(image_mse).clamp(min=1e-10)
    probs = counts / counts.sum()
    return {
        "images": len(images),
        "psnr_db": (10 * torch.log10(4 / image_mse)).mean().item(),
        "psnr_of_mean_mse_db": 10 * math.log10(4 / image_mse.mean().item()),
        "utilization": (counts > 0).float().mean().item(),
        "perplexity": torch.exp(-(probs * probs.clamp(min=1e-12).log()).sum()).item(),
        "reencode_same_code_rate": same_codes / counts.sum().item(),
    }


# -- the run -----------------------------------------------------------------------------------------


def build_model(args) -> ChameleonFusionVQVAE:
    if args.init_from:
        return ChameleonFusionVQVAE.from_pretrained(args.init_from)
    config = ChameleonFusionVQVAEConfig(
        resolution=args.resolution,
        in_channels=args.in_channels,
        base_channels=args.base_channels,
        channel_multiplier=args.channel_multiplier,
        num_res_blocks=args.num_res_blocks,
        attn_resolutions=args.attn_resolutions,
        mid_attention=not args.no_mid_attention,
        latent_channels=args.latent_channels,
        embed_dim=args.embed_dim,
        codebook_size=args.codebook_size,
        quantizer=args.quantizer,
        fsq_levels=args.fsq_levels,
        commitment_beta=args.commitment_beta,
        ema_decay=args.ema_decay,
        dead_code_threshold=args.dead_code_threshold,
        reconstruction_loss=args.reconstruction_loss,
    )
    return ChameleonFusionVQVAE(config)


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def run(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    if args.label_loss_weight < 0:
        raise ValueError(f"--label-loss-weight must be >= 0, got {args.label_loss_weight}")
    accelerator = Accelerator(cpu=args.cpu)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    model = build_model(args)
    config = model.config
    train_set, eval_set = build_datasets(args, config.resolution, config.in_channels)

    label_head = LabelHead(config, count_classes(train_set)) if args.label_loss_weight else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += list(label_head.parameters()) if label_head is not None else []
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, args.steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if label_head is not None:
        label_head = accelerator.prepare(label_head)
    discriminator = disc_optimizer = None
    if args.gan_weight > 0:
        discriminator = PatchDiscriminator(config.in_channels)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.lr, betas=(0.5, 0.9))
        discriminator, disc_optimizer = accelerator.prepare(discriminator, disc_optimizer)

    start_step = 0
    checkpoint = output_dir / CHECKPOINT_DIR
    if args.resume and (checkpoint / "trainer_state.json").exists():
        accelerator.load_state(str(checkpoint))
        start_step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")

    last_step = min(args.steps, args.stop_at or args.steps)
    sampler = StepBatches(
        len(train_set), args.batch_size, args.seed, start_step, last_step,
        accelerator.process_index, accelerator.num_processes,
    )
    # its own generator: iterating must not draw from the global RNG that a resumed run restores
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed)
    )
    unwrapped = accelerator.unwrap_model(model)
    progress = tqdm(total=args.steps, initial=start_step, disable=not accelerator.is_local_main_process)
    log_path, started = output_dir / "log.jsonl", time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    for step, batch in enumerate(loader, start=start_step):
        pixels = to_pixel_values(_first(batch), config.in_channels).to(accelerator.device)
        out = model(pixels)
        loss = out.loss
        if label_head is not None:
            label_loss = F.cross_entropy(label_head(out.quantized), batch[1].to(accelerator.device))
            loss = loss + args.label_loss_weight * label_loss
        use_gan = discriminator is not None and step >= args.gan_start
        if use_gan:
            generator_loss = -discriminator(out.reconstruction).mean()
            weight = adaptive_gan_weight(out.reconstruction_loss, generator_loss, unwrapped.decoder.conv_out.weight)
            loss = loss + args.gan_weight * weight * generator_loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if use_gan:
            disc_loss = hinge_discriminator_loss(discriminator(pixels), discriminator(out.reconstruction.detach()))
            accelerator.backward(disc_loss)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
        progress.update(1)

        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            record = {
                "step": done,
                "loss": out.loss.item(),
                "reconstruction_loss": out.reconstruction_loss.item(),
                "quantizer_loss": out.quantizer_loss.item(),
                "psnr_db": psnr(out.reconstruction.detach(), pixels).mean().item(),
                "batch_utilization": out.utilization.item(),
                "batch_perplexity": out.perplexity.item(),
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.time() - started, 1),
            }
            if use_gan:
                record["disc_loss"] = disc_loss.item()
            if label_head is not None:
                record["label_loss"] = label_loss.item()
            progress.set_postfix(psnr=f"{record['psnr_db']:.2f}", util=f"{record['batch_utilization']:.2f}")
            if accelerator.is_main_process:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
        if done % args.save_every == 0 or done == last_step:
            save_checkpoint(accelerator, checkpoint, done)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir)
        if last_step == args.steps and len(eval_set):
            eval_images = torch.stack([_first(eval_set[i]) for i in range(len(eval_set))])
            metrics = evaluate_tokenizer(unwrapped, eval_images)
            metrics["train_seconds_this_run"] = round(time.time() - started, 1)
            (output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
            accelerator.print(json.dumps(metrics, indent=2))
    accelerator.end_training()
    return 0


def save_checkpoint(accelerator, checkpoint: Path, step: int):
    accelerator.save_state(str(checkpoint))
    if accelerator.is_main_process:
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
