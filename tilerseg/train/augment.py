"""Augmentation presets on albumentations, as in the UNet++ comparison seed.

Images reach the pipeline as float32 scaled to [0, 1] with any number of
bands; masks as uint8 class indices (255 = ignore). Geometric transforms
move both; pixels they bring in from outside are mirrored, as the tiler
pads. ``light`` is the eight symmetries of the square plus mild
brightness/contrast; ``medium`` adds shift-scale-rotate and random resized
crops; ``heavy`` adds coarse dropout, noise and blur, and stronger ranges.
``elastic`` is ``light`` plus the U-Net paper's smooth deformations: random
displacements on a coarse 3 x 3 grid, 10 px at most, interpolated over the
image (bicubic; the mask nearest)."""
from __future__ import annotations

from ..errors import InputError

PRESETS = ("none", "light", "elastic", "medium", "heavy")


def build_augment(preset: str, crop: int, seed: int | None = None, bands: int | None = None):
    """An albumentations ``Compose`` for ``preset``, or None for ``none``
    (``bands``: the images' band count, where known)."""
    if preset not in PRESETS:
        raise InputError(f"unknown augment preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if preset == "elastic" and bands not in (None, 1, 3):
        raise InputError(f"augment: elastic deforms grey or RGB images only (albumentations' GridElasticDeform); "
                         f"these have {bands} bands: use light, medium or heavy")
    if preset == "none":
        return None
    import albumentations as A
    import cv2

    reflect = cv2.BORDER_REFLECT_101
    d4 = [A.HorizontalFlip(p=0.5), A.RandomRotate90(p=1.0), A.Transpose(p=0.5)]
    if preset == "light":
        steps = d4 + [A.RandomBrightnessContrast(0.1, 0.1, p=0.5)]
    elif preset == "elastic":
        steps = d4 + [A.GridElasticDeform(num_grid_xy=(3, 3), magnitude=10, interpolation=cv2.INTER_CUBIC,
                                          mask_interpolation=cv2.INTER_NEAREST, p=0.9),
                      A.RandomBrightnessContrast(0.1, 0.1, p=0.5)]
    elif preset == "medium":
        steps = d4 + [
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                     border_mode=reflect, p=0.5),
            A.RandomResizedCrop((crop, crop), scale=(0.6, 1.0), ratio=(0.8, 1.25), p=0.25),
            A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
        ]
    else:
        steps = d4 + [
            A.Affine(translate_percent=(-0.1, 0.1), scale=(0.8, 1.25), rotate=(-45, 45), shear=(-8, 8),
                     border_mode=reflect, p=0.7),
            A.RandomResizedCrop((crop, crop), scale=(0.4, 1.0), ratio=(0.75, 1.33), p=0.4),
            A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.03, 0.1),
                            hole_width_range=(0.03, 0.1), fill=0.0, p=0.5),
            A.RandomBrightnessContrast(0.3, 0.3, p=0.7),
            A.OneOf([A.GaussNoise(std_range=(0.01, 0.05)), A.GaussianBlur(blur_limit=(3, 5))], p=0.3),
        ]
    return A.Compose(steps, seed=seed)
