"""Train-time augmentation for your own data, from ``timm.data``'s transforms (off by default: the VTAB-1k protocol
of the literature trains on the squash-resized images as they are).

The transforms act on the squash-resized image (the decode-once cache's pixels, or the decode path's): a
random-resized crop (``RandomResizedCropAndInterpolation``, bicubic, back to ``--img-size``), a horizontal flip, a
timm policy (RandAugment ``rand-...``, AugMix ``augmix-...``, AutoAugment ``v0``/``original``) in that order, as
timm's ``transforms_imagenet_train`` orders them; mixup/cutmix (``timm.data.Mixup``) mix whole batches on the
device. Every setting is a run setting, so it is part of the run's identity.
"""
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp
from torch.utils.data import Dataset
from torchvision import transforms

from .run_config import RunConfig, RunError


def augments(cfg: RunConfig) -> bool:
    """True when ``cfg`` asks for any per-image train-time augmentation."""
    return bool(cfg.crop_scale or cfg.hflip or cfg.auto_augment)


def image_transform(cfg: RunConfig, mean: Sequence[float]) -> Optional[Callable[[Image.Image], Image.Image]]:
    """The PIL -> PIL train transform of ``cfg`` (None when there is none); RunError naming a bad policy."""
    steps: list = []
    if cfg.crop_scale:
        steps.append(RandomResizedCropAndInterpolation(cfg.img_size, scale=(cfg.crop_scale, 1.0),
                                                       interpolation='bicubic'))
    if cfg.hflip:
        steps.append(transforms.RandomHorizontalFlip(cfg.hflip))
    if cfg.auto_augment:  # timm's hyper-parameters for its policies (transforms_imagenet_train)
        params = dict(translate_const=int(cfg.img_size * 0.45), img_mean=tuple(round(255 * m) for m in mean),
                      interpolation=str_to_pil_interp('bicubic'))
        try:
            if cfg.auto_augment.startswith('rand'):
                steps.append(rand_augment_transform(cfg.auto_augment, params))
            elif cfg.auto_augment.startswith('augmix'):
                steps.append(augment_and_mix_transform(cfg.auto_augment, dict(params, translate_pct=0.3)))
            else:
                steps.append(auto_augment_transform(cfg.auto_augment, params))
        except (AssertionError, KeyError, ValueError, IndexError) as e:
            raise RunError(f'--auto-augment {cfg.auto_augment!r} is not a timm policy (e.g. rand-m9-mstd0.5-inc1, '
                           f'augmix-m5-w4-d2, v0, original): {e or type(e).__name__}') from None
    return transforms.Compose(steps) if steps else None


class AugmentedSplit(Dataset):
    """A decoded split (``CachedSplit`` or ``ImageSplit``: uint8 (3, H, W), label) with ``transform`` applied to
    each image as a PIL image, returned as uint8 (3, H, W) again (normalised on the device, as always)."""

    def __init__(self, split: Any, transform: Callable[[Image.Image], Image.Image]) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        pixels, label = self.split[index]
        image = Image.fromarray(np.ascontiguousarray(pixels.numpy().transpose(1, 2, 0)))  # (3, H, W) -> (H, W, 3)
        out = np.asarray(self.transform(image).convert('RGB'), dtype=np.uint8).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(out)), label


def batch_mixer(cfg: RunConfig, num_classes: int) -> Optional[Mixup]:
    """timm's ``Mixup`` for ``--mixup``/``--cutmix`` (with the run's label smoothing), or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)
