"""Seeded augmentation of a windowed slice and its masks together (MONAI style: settings in ``__init__``,
work in ``__call__``, randomness from the generator passed in, so a seed reproduces every copy).

Geometric transforms (rotation, translation, scaling, shear, flips) move image and masks identically
(bilinear for the image, nearest for masks); intensity transforms (brightness, contrast) touch only the
image. Arrays are 2D slices ``[j, i]``; the image is the windowed CT in [0, 1]. Inputs are never modified.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .config import AugmentationConfig


class SliceAugmenter:
    """Random affine + flip + brightness/contrast for one slice and any number of masks."""

    def __init__(self, config: AugmentationConfig | None = None) -> None:
        self.config = config or AugmentationConfig()

    def sample_matrix(
        self, rng: np.random.Generator, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """A random 2x2 matrix and offset mapping output (j, i) indices to input (j, i) indices."""
        c = self.config
        angle = math.radians(rng.uniform(-c.rotation_deg, c.rotation_deg))
        shear = math.radians(rng.uniform(-c.shear_deg, c.shear_deg))
        scale = rng.uniform(*c.scale_range)
        shift = rng.uniform(-c.translation_fraction, c.translation_fraction, size=2) * np.asarray(shape)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        shearing = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
        forward = rotation @ shearing * scale  # input -> output, about the centre
        inverse = np.linalg.inv(forward)
        centre = (np.asarray(shape, dtype=float) - 1.0) / 2.0
        offset = centre - inverse @ (centre + shift)
        return inverse, offset

    def __call__(
        self, image_ji: np.ndarray, masks_ji: dict[str, np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """An augmented copy of ``image_ji`` (float32 [0, 1]) and of every mask (same dtype as given)."""
        c = self.config
        image = np.asarray(image_ji, dtype=np.float32)
        matrix, offset = self.sample_matrix(rng, image.shape)
        out_image = ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant", cval=0.0)
        out_masks = {
            name: ndimage.affine_transform(
                np.asarray(mask), matrix, offset=offset, order=0, mode="constant", cval=0
            ).astype(np.asarray(mask).dtype)
            for name, mask in masks_ji.items()
        }
        if rng.random() < c.flip_lr_prob:
            out_image = out_image[:, ::-1]
            out_masks = {k: v[:, ::-1] for k, v in out_masks.items()}
        if rng.random() < c.flip_ud_prob:
            out_image = out_image[::-1, :]
            out_masks = {k: v[::-1, :] for k, v in out_masks.items()}
        contrast = rng.uniform(*c.contrast_range)
        brightness = rng.uniform(-c.brightness, c.brightness)
        out_image = np.clip((out_image - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0).astype(np.float32)
        return np.ascontiguousarray(out_image), {k: np.ascontiguousarray(v) for k, v in out_masks.items()}
