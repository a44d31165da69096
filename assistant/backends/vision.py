"""EfficientNet-Lite0 (ImageNet, experts/backbone.py) as the embedded VLM's frozen vision tower; it
stands in for the CLIP tower a LLaVA-style model would use (../shared/MODELS.md section 4)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from experts.backbone import lite0

VISION_TOWER = "EfficientNet-Lite0 (ImageNet, frozen)"
IMAGE_SIZE = 224  # the tower sees the image resized to 224 x 224: a 7 x 7 feature map


class VisionTower(nn.Module):
    """Frozen EfficientNet-Lite0 trunk: RGB uint8 images -> (n, grid*grid, 1280) feature tokens, the
    7 x 7 final feature map average-pooled to grid x grid."""

    def __init__(self, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.trunk = lite0()
        self.trunk.reset_classifier(0)
        self.trunk.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> VisionTower:
        super().train(mode)
        self.trunk.eval()  # frozen: batch-norm statistics never move
        return self

    @staticmethod
    def preprocess(images: list[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        batch = []
        for image in images:
            rgb = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
            resized = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
            batch.append((np.asarray(resized, dtype=np.float32) / 255.0 - 0.5) / 0.5)
        return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.trunk.forward_features(pixels)  # (n, 1280, 7, 7)
        pooled = nn.functional.adaptive_avg_pool2d(features, self.grid)
        return pooled.flatten(2).transpose(1, 2)  # (n, grid*grid, 1280)
