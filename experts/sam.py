"""The SAM teacher: segment-anything (A. Kirillov et al., "Segment Anything", ICCV 2023) with an official
checkpoint the user supplies (vit_b, vit_l or vit_h; no SAM weights ship with any package, see
../shared/MODELS.md section 6), prompted by the other experts' coarse masks so that it returns crisp,
object-aligned masks. As in "From Passive Perception to Active Memory: BoxPromptIML", its box-prompted
masks are what the lightweight student (experts/student.py) learns from.

segment-anything imports torchvision. The pins in requirements.txt (torch==2.14.1, torchvision==0.29.1)
install matching builds here and on a CUDA machine (any local build such as 2.14.1+cu126 satisfies
them), and segment-anything is imported only when a SAM model is built, so the rest of the package never
pays for it. Checkpoints are read with `torch.load(weights_only=True, map_location="cpu")` (a plain
state dict; nothing in the file is executed) and loaded strictly, so a checkpoint of another model type
is refused with a message rather than half-loaded.

`tiny_sam()` builds a randomly initialised SAM (332k parameters) from the package's own modules: the
tests run the whole teacher path with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

from experts.base import ModelNotAvailableError

log = logging.getLogger(__name__)

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")
INSTALL_HINT = "pip install segment-anything==1.0 torch==2.14.1 torchvision==0.29.1"
CHECKPOINT_HINT = (
    "download an official checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth) "
    "from the segment-anything repository and pass its path"
)
MASK_LOGIT = 8.0  # SAM's own low-resolution logits sit around this magnitude


def _segment_anything():
    try:
        import segment_anything
    except ImportError as exc:  # torchvision missing or not matching torch
        raise ModelNotAvailableError(
            f"segment-anything cannot be imported ({exc}); install it with `{INSTALL_HINT}`"
        ) from exc
    return segment_anything


def tiny_sam(img_size: int = 256, dim: int = 64) -> torch.nn.Module:
    """A randomly initialised SAM small enough for tests (about 0.33M parameters), built from
    segment-anything's own modules, in eval mode."""
    _segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        out_chans=dim,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
        qkv_bias=True,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(img_size // 16,) * 2,
        input_image_size=(img_size,) * 2,
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=128, num_heads=2),
        transformer_dim=dim,
        iou_head_depth=2,
        iou_head_hidden_dim=64,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder).eval()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_sam(checkpoint: str | Path, model_type: str = "vit_b", device: str | None = None) -> torch.nn.Module:
    """A SAM model of `model_type` with the weights of a checkpoint file, on `device` (default: CUDA
    when available), in eval mode. model_type "tiny" is the test model of `tiny_sam()`."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelNotAvailableError(f"{path}: no such SAM checkpoint; {CHECKPOINT_HINT}")
    # Built without the checkpoint: segment-anything's own loader calls torch.load with no map_location.
    model = tiny_sam() if model_type == "tiny" else _segment_anything().sam_model_registry[model_type]()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelNotAvailableError(
            f"{path} is not a readable SAM checkpoint ({exc}); {CHECKPOINT_HINT}"
        ) from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        guess = next((t for t in MODEL_TYPES if t in path.name), None)
        hint = f" (the file name suggests --model-type {guess})" if guess and guess != model_type else ""
        raise ModelNotAvailableError(
            f"{path} does not hold a SAM {model_type} model{hint}: {str(exc).splitlines()[0]}"
        ) from exc
    return model.to(device or default_device()).eval()


# --------------------------------------------------------------------------------------------------
# Prompts from a coarse mask


@dataclass(frozen=True)
class MaskPrompt:
    """One connected component of a coarse mask as a prompt: its bounding box (x0, y0, x1, y1, inclusive
    pixel corners as SAM expects), the most confident pixel inside it (x, y) and its share of the image."""

    box: tuple[float, float, float, float]
    point: tuple[float, float]
    component: np.ndarray  # bool HxW
    fraction: float


def prompts_from_mask(
    coarse: np.ndarray,
    threshold: float = 0.5,
    min_fraction: float = 0.001,
    max_prompts: int = 5,
    margin: float = 0.05,
    confidence: np.ndarray | None = None,
) -> list[MaskPrompt]:
    """Prompts from a coarse mask (bool) or heatmap (float in [0, 1]): one per connected component of
    at least `min_fraction` of the image, largest first; boxes grow by `margin` of their size (coarse
    masks tend to miss an object's edges). The point is the maximum of `confidence` (default: the
    coarse map itself) inside the component."""
    heatmap = (coarse if confidence is None else confidence).astype(np.float32)
    binary = (coarse if coarse.dtype == bool else coarse >= threshold).astype(np.uint8)
    height, width = binary.shape
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1
    prompts = []
    for index in order[:max_prompts]:
        x, y, w, h, area = (int(v) for v in stats[index])
        if area < min_fraction * binary.size:
            break
        grow_x, grow_y = margin * w, margin * h
        box = (
            max(0.0, x - grow_x),
            max(0.0, y - grow_y),
            min(width - 1.0, x + w - 1 + grow_x),
            min(height - 1.0, y + h - 1 + grow_y),
        )
        component = labels == index
        # The most confident pixel, after a blur so one speckle does not win over the body.
        smooth = cv2.blur(heatmap, (9, 9)) * component
        py, px = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
        prompts.append(MaskPrompt(box, (float(px), float(py)), component, area / binary.size))
    return prompts


class SamTeacher:
    """SAM's predictor with what the teacher needs: masks for boxes, and a coarse map turned into SAM's
    low-resolution mask input. Follows SamPredictor's interface (set_image, predict, reset_image)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(model)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, model_type: str = "vit_b", device: str | None = None):
        return cls(load_sam(checkpoint, model_type, device))

    @property
    def is_image_set(self) -> bool:
        return self.predictor.is_image_set

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        self.predictor.set_image(image, image_format)

    def reset_image(self) -> None:
        self.predictor.reset_image()

    def predict(self, *args, multimask_output: bool = False, **kwargs):
        """SamPredictor.predict; with multimask_output the masks come best-first by predicted IoU."""
        masks, scores, low_res = self.predictor.predict(*args, multimask_output=multimask_output, **kwargs)
        order = np.argsort(-scores)
        return masks[order], scores[order], low_res[order]

    def mask_input_from(self, probability: np.ndarray) -> np.ndarray:
        """A probability map over the image -> SAM's (1, 256, 256) logits in its padded input frame."""
        size = self.predictor.model.prompt_encoder.mask_input_size
        height, width = probability.shape
        scale = size[0] / max(height, width)
        resized = cv2.resize(
            probability.astype(np.float32),
            (max(1, round(width * scale)), max(1, round(height * scale))),
            interpolation=cv2.INTER_AREA,
        )
        frame = np.zeros(size, np.float32)
        frame[: resized.shape[0], : resized.shape[1]] = resized
        return (MASK_LOGIT * (2 * frame - 1))[None]

    def masks_for_boxes(
        self, image: np.ndarray, boxes: list[tuple[float, float, float, float]]
    ) -> np.ndarray:
        """Union of SAM's best mask for each box (bool HxW)."""
        self.set_image(image)
        union = np.zeros(image.shape[:2], bool)
        for box in boxes:
            masks, _, _ = self.predict(box=np.asarray(box, np.float32), multimask_output=True)
            union |= masks[0]
        self.reset_image()
        return union
