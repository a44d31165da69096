"""Manipulation localisation by a small learned segmenter: where in the photo was something pasted,
moved, removed or retouched. An EfficientNet-Lite0 encoder (ImageNet weights) and a light FPN decoder
see the colour image; a trace-enhancing front end sees what editing leaves behind and is fused with the
colour stream by attention:
  - gradient-operator tensor pre-processing (TP) and manipulation-trace attention (MTA), after
    Z. Guo, L. Wang, W. Yang, G. Yang, K. Li, "Rethinking gradient operator for exposing AI-enabled
    face forgeries" (GocNet), Expert Systems with Applications 2023: Sobel gradients of each colour
    channel, squashed to a scale-free range by a learned normalisation, then reweighted channel-wise
    and spatially by an attention computed from the traces themselves;
  - a residual stream of fixed SRM high-pass filters (J. Fridrich, J. Kodovsky, "Rich models for
    steganalysis of digital images", IEEE TIFS 2012; used for manipulation by P. Zhou, X. Han,
    V. Morariu, L. Davis, "Learning rich features for image manipulation detection", CVPR 2018) and a
    constrained convolution (B. Bayar, M. Stamm, "Constrained convolutional neural networks: a new
    approach towards general purpose image manipulation detection", IEEE TIFS 2018).
Trained by `python -m finetune.train_localiser` on CASIA v1 `train` and forgeries synthesised from
pristine `train` photos (finetune/synth.py), every image re-compressed and resized alike; the mask
threshold and the score's calibration were chosen on CASIA v1 `val` (experts/weights/manipulation.md).

Heatmap: per-pixel probability that the pixel was manipulated, shifted so 0.5 is the threshold chosen on
`val`. Score: calibrated probability (Platt scaling on `val`) that the image holds a manipulated region,
from an image head over the deepest features and the strongest pixels of the mask logits. One pass:
averaging the logits over flipped copies (`TEST_FLIPS`) was measured and is not shipped (the card says
why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from experts.base import (
    Evidence,
    ModelNotAvailableError,
    graphic_declined,
    not_applicable,
    nothing_to_examine,
)
from experts.fusion import THUMBNAIL_SIDE
from experts.image import LoadedImage
from experts.maps import fit_longest_side, mask_from_heatmap, regions_from_mask, resize_map

WEIGHTS_NAME = "manipulation"
ENCODER_STAGES = (1, 2, 3, 4)  # strides 4, 8, 16, 32; channels 24, 40, 112, 320
ENCODER_CHANNELS = (24, 40, 112, 320)
DECODER_CHANNELS = 64
TOP_FRACTION = 0.01  # share of pixels whose mean logit feeds the image head
# Test-time flips, as dims of an NCHW batch: the logits are averaged over these copies (each map flipped
# back). One pass, (): the three flips ((), (3,), (2,)) lifted the localiser's own pixel-F1 on CASIA `val`
# (experts/weights/manipulation.md) but not the fused result on `test`, and cut the refinement's gain.
TEST_FLIPS: tuple[tuple[int, ...], ...] = ((),)

_SRM = (
    np.array(
        [
            [[0, 0, 0, 0, 0], [0, -1, 2, -1, 0], [0, 2, -4, 2, 0], [0, -1, 2, -1, 0], [0, 0, 0, 0, 0]],
            [
                [-1, 2, -2, 2, -1],
                [2, -6, 8, -6, 2],
                [-2, 8, -12, 8, -2],
                [2, -6, 8, -6, 2],
                [-1, 2, -2, 2, -1],
            ],
            [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, -2, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
        ],
        np.float32,
    )
    / np.array([4, 12, 2], np.float32)[:, None, None]
)
_SOBEL = (
    np.array([[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]], np.float32) / 4
)


def conv_bn(inputs: int, outputs: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class TensorPreprocessing(nn.Module):
    """GocNet's TP: gradients are heavy-tailed and their scale follows the image's contrast, so each
    channel is divided by its mean magnitude, then a learned affine map and tanh squash it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, gradients: torch.Tensor) -> torch.Tensor:
        magnitude = gradients.abs().mean(dim=(2, 3), keepdim=True) + 1e-3
        return torch.tanh(self.scale * gradients / magnitude + self.shift)


class TraceAttention(nn.Module):
    """GocNet's MTA: channel attention (squeeze-excitation) then spatial attention (a 7x7 convolution
    over the channel mean and max), both computed from the trace features they reweight."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3), nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features * self.channel(features)
        pooled = torch.cat([features.mean(1, keepdim=True), features.amax(1, keepdim=True)], 1)
        return features * self.spatial(pooled)


class ConstrainedConv(nn.Module):
    """Bayar and Stamm's constrained convolution: each filter's centre is -1 and the rest sums to 1,
    so it predicts a pixel from its neighbours and passes on only the prediction error."""

    def __init__(self, inputs: int = 3, outputs: int = 3, kernel: int = 5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs, kernel, kernel) * 0.02)
        centre = torch.zeros(1, 1, kernel, kernel)
        centre[..., kernel // 2, kernel // 2] = 1
        self.register_buffer("centre", centre, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        off_centre = self.weight * (1 - self.centre)
        off_centre = off_centre / (off_centre.sum(dim=(1, 2, 3), keepdim=True) + 1e-6)
        return F.conv2d(images, off_centre - self.centre, padding=self.weight.shape[-1] // 2)


class TraceFrontEnd(nn.Module):
    """Editing traces at strides 4 and 8: TP gradients, SRM and constrained-convolution residuals,
    reweighted by MTA."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("srm", torch.from_numpy(_SRM)[:, None].repeat(3, 1, 1, 1), persistent=False)
        self.register_buffer("sobel", torch.from_numpy(_SOBEL)[:, None].repeat(3, 1, 1, 1), persistent=False)
        self.preprocess = TensorPreprocessing(6)
        self.constrained = ConstrainedConv()
        self.stem = nn.Sequential(conv_bn(18, 32, stride=2), conv_bn(32, 48, stride=2))
        self.attention = TraceAttention(48)
        self.down = conv_bn(48, 64, stride=2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # images in [-1, 1]; residual filters work in grey levels / 32, a range they keep near unit
        levels = images * 4.0
        srm = F.conv2d(F.pad(levels, (2, 2, 2, 2), mode="reflect"), self.srm, groups=3)
        gradients = F.conv2d(F.pad(levels, (1, 1, 1, 1), mode="reflect"), self.sobel, groups=3)
        traces = torch.cat([srm, self.constrained(levels), self.preprocess(gradients)], 1)
        stride4 = self.attention(self.stem(traces))
        return stride4, self.down(stride4)


class AttentionFusion(nn.Module):
    """Adds trace features to colour features where a learned gate (from both) says they help."""

    def __init__(self, colour: int, trace: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(trace, colour, 1)
        self.gate = nn.Sequential(nn.Conv2d(colour + trace, colour, 1), nn.Sigmoid())

    def forward(self, colour: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
        return colour + self.gate(torch.cat([colour, trace], 1)) * self.project(trace)


class LocaliserNet(nn.Module):
    """Encoder, FPN decoder, optional trace front end; returns (mask logits at stride 4, image logit)."""

    def __init__(self, trace_front_end: bool = True, pretrained: bool = False) -> None:
        super().__init__()
        from experts.backbone import lite0

        self.encoder = lite0(pretrained=pretrained, features_only=True, out_indices=ENCODER_STAGES)
        self.lateral = nn.ModuleList(nn.Conv2d(c, DECODER_CHANNELS, 1) for c in ENCODER_CHANNELS)
        self.smooth = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(DECODER_CHANNELS, DECODER_CHANNELS, 3, padding=1, groups=DECODER_CHANNELS),
                conv_bn(DECODER_CHANNELS, DECODER_CHANNELS, kernel=1),
            )
            for _ in ENCODER_CHANNELS[:-1]
        )
        self.trace = TraceFrontEnd() if trace_front_end else None
        if self.trace is not None:
            self.fuse4 = AttentionFusion(DECODER_CHANNELS, 48)
            self.fuse8 = AttentionFusion(DECODER_CHANNELS, 64)
        self.mask_head = nn.Sequential(conv_bn(DECODER_CHANNELS, 32), nn.Conv2d(32, 1, 1))
        self.image_head = nn.Linear(ENCODER_CHANNELS[-1] + 2, 1)
        # Set from CASIA v1 val by the recipe: pixel logit threshold, Platt scaling of the image logit.
        self.register_buffer("pixel_threshold_logit", torch.zeros(()))
        self.register_buffer("score_scale", torch.ones(()))
        self.register_buffer("score_shift", torch.zeros(()))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(images)
        merged = self.lateral[-1](features[-1])
        traces = self.trace(images) if self.trace is not None else None
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            up = F.interpolate(merged, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            merged = self.smooth[level](lateral + up)
            if traces is not None and level == 1:
                merged = self.fuse8(merged, _fit(traces[1], merged))
            if traces is not None and level == 0:
                merged = self.fuse4(merged, _fit(traces[0], merged))
        logits = self.mask_head(merged)
        flat = logits.flatten(1)
        top = flat.topk(max(1, int(flat.shape[1] * TOP_FRACTION)), dim=1).values
        pooled = torch.cat([features[-1].mean(dim=(2, 3)), top.mean(1, keepdim=True), top[:, :1]], 1)
        return logits, self.image_head(pooled)[:, 0]


def _fit(trace: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if trace.shape[-2:] == like.shape[-2:]:
        return trace
    return F.interpolate(trace, size=like.shape[-2:], mode="bilinear", align_corners=False)


@cache
def load_localiser(path: str | Path | None = None) -> LocaliserNet:
    """The shipped network, or the one in a safetensors file (a training run's), with weights stored in
    fp16 and run in fp32, in eval mode; cached."""
    from experts.learned import load_weights

    if path is None:
        stored, source = load_weights(WEIGHTS_NAME), f"experts/weights/{WEIGHTS_NAME}.safetensors"
    else:
        from safetensors.torch import load_file

        stored, source = load_file(str(path)), str(path)
    state = {key: value.float() for key, value in stored.items()}
    model = LocaliserNet(trace_front_end=any(key.startswith("trace.") for key in state), pretrained=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelNotAvailableError(
            f"{source} does not fit this code (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); reinstall the package or retrain with finetune.train_localiser"
        )
    return model.eval()


def flipped_logits(
    model: LocaliserNet, images: torch.Tensor, flips: Sequence[tuple[int, ...]] = TEST_FLIPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel logits, image logits) of a normalised NCHW batch, each averaged over the flipped copies
    (every pixel map flipped back first)."""
    pixel, image = [], []
    for dims in flips:
        logits, image_logit = model(images.flip(dims) if dims else images)
        pixel.append(logits.flip(dims) if dims else logits)
        image.append(image_logit)
    return torch.stack(pixel).mean(0), torch.stack(image).mean(0)


def predict(model: LocaliserNet, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """(pixel probability map at the input's size, shifted so 0.5 is the chosen threshold; calibrated
    image score) for an RGB uint8 image at working size, over the test-time flips."""
    from experts.backbone import normalise

    with torch.inference_mode():
        logits, image_logit = flipped_logits(model, normalise(pixels))
        logits = F.interpolate(logits, size=pixels.shape[:2], mode="bilinear", align_corners=False)
        heatmap = torch.sigmoid(logits[0, 0] - model.pixel_threshold_logit).numpy()
        score = torch.sigmoid(model.score_scale * image_logit[0] + model.score_shift).item()
    return heatmap.astype(np.float32), float(score)


@dataclass(frozen=True)
class ManipulationLocaliser:
    name = "manipulation"
    # 2: works at 384 px (was 512); 3: the summary states the score once; 4: no thumbnails; 5: declines a
    # featureless image; 6: declines a graphic; 7: also flat colours with antialiased edges, or text
    # 8: declines random noise
    version = "8"
    description = (
        "Learned manipulation localiser: a small neural network, trained on spliced, copied, removed and "
        "retouched regions, that maps where the photo was edited and scores how likely an edit is."
    )
    # Longest side the network sees; larger images are shrunk (area). 384 is CASIA's size, where the
    # score is calibrated: at 512 it ran higher on other photos and found less in them
    # (python -m benchmarks.localiser_scale, on val; experts/weights/manipulation.md).
    working_side: int = 384
    # A thumbnail (short side at most THUMBNAIL_SIDE) is far below the photos it was trained on (230-600
    # px, 256 px crops): on CIFAKE's 32 px val images it scored >= 0.5 on 84% of the real ones, and the
    # fusion cited that as editing evidence. Thumbnails are judged by the experts made for them.
    min_side: int = THUMBNAIL_SIDE + 1
    min_working_side: int = 32  # a long thin image shrunk below this leaves the network nothing to pad
    min_region_fraction: float = 0.002

    def analyze(self, image: LoadedImage) -> Evidence:
        if min(image.height, image.width) < self.min_side:
            return not_applicable(
                self.name,
                f"The image is too small for the learned manipulation localiser ({image.width}x"
                f"{image.height} pixels; it was trained on photos and needs at least {self.min_side} on "
                "each side).",
                self.version,
            )
        working_short = min(image.height, image.width) * min(
            1.0, self.working_side / max(image.height, image.width)
        )
        if working_short < self.min_working_side:
            return not_applicable(
                self.name,
                f"The image ({image.width}x{image.height}) is too long and thin for the learned manipulation "
                f"localiser: shrunk to its {self.working_side} px working size, the short side would be "
                f"{working_short:.0f} px (it needs at least {self.min_working_side}).",
                self.version,
            )
        if what := image.nothing_to_examine:
            return nothing_to_examine(self.name, self.version, what)
        if image.graphic:
            return graphic_declined(
                self.name,
                self.version,
                "the learned manipulation localiser was trained on photographs and does not judge graphics.",
            )
        try:
            model = load_localiser()
        except ModelNotAvailableError as exc:
            return not_applicable(self.name, f"The manipulation localiser's weights are unavailable: {exc}")
        pixels = fit_longest_side(np.ascontiguousarray(image.pixels), self.working_side)
        heatmap, score = predict(model, pixels)
        shape = (image.height, image.width)
        heatmap_full = np.clip(resize_map(heatmap, shape), 0.0, 1.0).astype(np.float32)
        mask = mask_from_heatmap(heatmap_full, 0.5, self.min_region_fraction)
        fraction = float(mask.mean())
        details = {
            "indicates": "manipulated",
            "image_score": round(score, 4),
            "masked_fraction": round(fraction, 4),
            "peak_pixel_probability": round(float(heatmap.max()), 4),
            "working_size": [int(pixels.shape[1]), int(pixels.shape[0])],
        }
        # The score is shown beside every finding ("score 0.73"), so the sentence does not repeat it
        # as a percentage: one number less for the assistant to copy, and none to read as a verdict.
        percent = f"{100 * fraction:.1f}%"
        if score >= 0.5 and mask.any():
            summary = f"A network trained on edited photos marks {percent} of the image as likely edited."
        elif score >= 0.5:
            summary = (
                "A network trained on edited photos finds signs of an edit but cannot pin them to one "
                "region: weak evidence on its own."
            )
        else:
            summary = "A network trained on edited photos finds no convincing edited region" + (
                f"; {percent} of the image is faintly marked." if mask.any() else "."
            )
        return Evidence(
            expert=self.name,
            score=round(min(max(score, 0.0), 1.0), 4),
            applicable=True,
            summary=summary,
            heatmap=heatmap_full,
            mask=mask,
            regions=regions_from_mask(mask, heatmap_full, "likely edited"),
            details=details,
            version=self.version,
        )
