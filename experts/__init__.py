"""Experts measure; they know nothing of the assistant. Each expert is one module plus one
`register_expert(...)` line below: the CLI, the report, tool schemas, the UI and `forensics eval`
discover it from the registry."""

from experts.ai_generated import AIGeneratedImage
from experts.base import (
    Analysis,
    Driver,
    Evidence,
    Expert,
    ExpertError,
    ForensicsError,
    ImageFacts,
    InvalidImageError,
    ModelNotAvailableError,
    Region,
    UnknownExpertError,
    Verdict,
)
from experts.c2pa import ContentCredentials
from experts.copy_move import CopyMove
from experts.ela import ErrorLevelAnalysis
from experts.faces import DeepfakeFaces
from experts.frequency import FrequencyFingerprint
from experts.image import LoadedImage, load_image
from experts.invisible_watermark import InvisibleWatermark
from experts.jpeg import JpegCompression
from experts.manipulation import ManipulationLocaliser
from experts.metadata import MetadataExpert
from experts.noise import NoiseInconsistency
from experts.refine import RefinedLocalisation
from experts.registry import available_experts, expert_class, get_expert, register_expert
from experts.runner import run_experts
from experts.watermark import Watermark

register_expert(ErrorLevelAnalysis)
register_expert(NoiseInconsistency)
register_expert(JpegCompression)
register_expert(CopyMove)
register_expert(MetadataExpert)
register_expert(FrequencyFingerprint)
register_expert(ContentCredentials)
register_expert(InvisibleWatermark)
register_expert(Watermark)
register_expert(ManipulationLocaliser)
register_expert(RefinedLocalisation)
register_expert(AIGeneratedImage)
register_expert(DeepfakeFaces)

__all__ = [
    "Analysis",
    "Driver",
    "Evidence",
    "Expert",
    "ExpertError",
    "ForensicsError",
    "ImageFacts",
    "InvalidImageError",
    "LoadedImage",
    "ModelNotAvailableError",
    "Region",
    "UnknownExpertError",
    "Verdict",
    "available_experts",
    "expert_class",
    "get_expert",
    "load_image",
    "register_expert",
    "run_experts",
]
