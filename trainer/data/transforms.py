"""Image transform: resize (cover the target), center or seeded random crop, optional flip, to a
tensor in [-1, 1]; keeps SDXL's size conditioning (original_size, crop_top_left, target_size).

Augmentation is a pure function of (seed, record id, variant): `variant` k in [0, variants)
selects one fixed random crop/flip per item, so the latent cache can store each variant once
(epoch e uses variant e % variants, see `dataset.py`). With crop="center" and flip="none"
there is one variant and the transform is deterministic.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SizeCond:
    """SDXL micro-conditioning of one image (pixels, (height, width) order as in diffusers)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def time_ids(self) -> torch.Tensor:
        """[6] = original_size + crop_top_left + target_size (SDXL `add_time_ids`)."""
        return torch.tensor([*self.original_size, *self.crop_top_left, *self.target_size], dtype=torch.float32)


def _unit_draws(seed: int, record_id: str, variant: int, n: int) -> list[float]:
    """n uniforms in [0, 1), a pure function of (seed, id, variant) (process and platform independent)."""
    digest = hashlib.sha256(f"{seed}\0{record_id}\0{variant}".encode("utf-8")).digest()
    return [int.from_bytes(digest[4 * i:4 * i + 4], "little") / 2 ** 32 for i in range(n)]


@dataclass(frozen=True)
class ImageTransform:
    """resolution: int (square) or (height, width); crop: "center" | "random"; flip: "none" | "random"."""

    resolution: int | tuple[int, int] = 512
    crop: str = "center"
    flip: str = "none"
    seed: int = 0
    variants: int = 1

    def __post_init__(self):
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if self.flip not in ("none", "random"):
            raise ValueError(f"flip must be 'none' or 'random', got {self.flip!r}")
        if self.variants < 1:
            raise ValueError(f"variants must be >= 1, got {self.variants}")
        h, w = self.size
        if h % 8 or w % 8 or h <= 0 or w <= 0:
            raise ValueError(f"resolution {self.resolution} must be positive multiples of 8 (VAE downsampling)")

    @property
    def size(self) -> tuple[int, int]:
        r = self.resolution
        return (int(r), int(r)) if isinstance(r, int) else (int(r[0]), int(r[1]))

    @property
    def deterministic(self) -> bool:
        return self.crop == "center" and self.flip == "none"

    @property
    def num_variants(self) -> int:
        return 1 if self.deterministic else self.variants

    def key(self) -> str:
        """Folder name of this transform in the cache: `<res>_<crop>[_flip]_s<seed>n<variants>`."""
        h, w = self.size
        res = str(h) if h == w else f"{h}x{w}"
        key = f"{res}_{self.crop}" + ("_flip" if self.flip == "random" else "")
        return key if self.deterministic else f"{key}_s{self.seed}n{self.variants}"

    def params(self, record_id: str, variant: int, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], bool]:
        """(resized (h, w), crop (top, left), flipped) for an image of `image_size` = (h, w)."""
        th, tw = self.size
        h, w = image_size
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        u_top, u_left, u_flip = _unit_draws(self.seed, record_id, variant % self.num_variants, 3)
        if self.crop == "center":
            top, left = (rh - th) // 2, (rw - tw) // 2
        else:
            top, left = int(u_top * (rh - th + 1)), int(u_left * (rw - tw + 1))
        return (rh, rw), (top, left), self.flip == "random" and u_flip < 0.5

    def __call__(self, image, record_id: str = "", variant: int = 0) -> tuple[torch.Tensor, SizeCond]:
        """PIL RGB image -> (pixels [3, H, W] in [-1, 1], SizeCond)."""
        from PIL import Image

        th, tw = self.size
        (rh, rw), (top, left), flipped = self.params(record_id, variant, (image.height, image.width))
        img = image.resize((rw, rh), Image.BICUBIC) if (rh, rw) != (image.height, image.width) else image
        img = img.crop((left, top, left + tw, top + th))
        if flipped:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            left = rw - left - tw  # the crop's left edge in the flipped resized image
        arr = np.asarray(img, dtype=np.uint8).copy()  # [H, W, 3]
        pixels = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]
        return pixels, SizeCond((image.height, image.width), (top, left), (th, tw))
