"""Bring your own model: any local transformers chat model, text-only or vision-language.

A text model (Qwen2.5, SmolLM2, Llama, ...) loads with AutoModelForCausalLM and ignores images: the
agent gives it the evidence as text. A vision-language model (Qwen2-VL / Qwen2.5-VL, SmolVLM /
Idefics3, LLaVA, ...: any model type transformers maps to AutoModelForImageTextToText) loads with its
processor and sees the images of the conversation. A LoRA adapter (peft) can be put on top.

Nothing is downloaded unless the caller passes allow_download=True; then `spec` may be a hub id.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from assistant.backends.base import Guide, Message, ModelInfo, TokenCallback
from assistant.backends.chat import (
    StopRule,
    TemplateSupport,
    TextStream,
    chat_dicts,
    openai_tools,
    pick_device,
    pick_dtype,
    stop_rule,
)
from experts.base import ModelNotAvailableError

log = logging.getLogger(__name__)


class _GenerateStreamer:
    """Adapts `generate`'s streamer calls to a TextStream; generate calls it in this thread, first with
    the prompt (skipped), then with each new token."""

    def __init__(self, stream: TextStream) -> None:
        self.stream = stream
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stream.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _StopCriteria(StoppingCriteria):
    """chat.StopRule as a transformers stopping criterion: it reads the reply from the generated ids
    (everything after the prompt), whatever order generate calls it and the streamer in."""

    def __init__(self, tokenizer: Any, rule: StopRule, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.rule = rule
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        ids = input_ids[0, self.prompt_length :].tolist()
        done = self.rule(ids, self.tokenizer.decode(ids, skip_special_tokens=True))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _GuideProcessor(LogitsProcessor):
    """A Guide as a logits processor: text the guide asks for after a token is tokenised and forced,
    one token per step (generate has no way to read several tokens in one step)."""

    def __init__(self, tokenizer: Any, guide: Guide, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.guide = guide
        self.prompt_length = prompt_length
        self.queue: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.queue and input_ids.shape[1] > self.prompt_length:
            ids = input_ids[0, self.prompt_length :].tolist()
            forced = self.guide(self.tokenizer.decode(ids, skip_special_tokens=True))
            if forced:
                self.queue = self.tokenizer(forced, add_special_tokens=False)["input_ids"]
        if not self.queue:
            return scores
        forced_scores = torch.full_like(scores, -float("inf"))
        forced_scores[:, self.queue.pop(0)] = 0.0
        return forced_scores


class TransformersBackend:
    """A transformers model behind the Backend interface (greedy, streaming)."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any | None, info: ModelInfo) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor  # None for a text-only model
        self.info = info
        template = (processor or tokenizer).chat_template
        self.support = TemplateSupport.of(template)
        config = copy.deepcopy(model.generation_config)
        # Greedy: clear the sampling settings a model ships with, so generate neither samples nor warns.
        config.do_sample, config.num_beams = False, 1
        config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            config.pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        self.generation_config = config

    @property
    def sees_images(self) -> bool:
        return self.processor is not None

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def inputs(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] = ()) -> Any:
        """The model inputs for a conversation (token ids, and pixel values for a VLM)."""
        chat, _ = chat_dicts(
            messages, tools, self.support, image_content="parts" if self.sees_images else None
        )
        extra = {"tools": openai_tools(tools)} if tools and self.support.tools else {}
        renderer = self.processor or self.tokenizer
        # sanitize_control_tokens: a control token inside a message (say "<|im_end|>" in EXIF text that
        # a tool quotes) is encoded as plain text, so it cannot end a turn or forge a new one.
        return renderer.apply_chat_template(
            chat,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=True,
            **extra,
        )

    def generate(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]] = (),
        max_new_tokens: int = 256,
        on_token: TokenCallback | None = None,
        guide: Guide | None = None,
    ) -> str:
        inputs = self.inputs(messages, tools).to(self.model.device)
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = max_new_tokens
        stream = TextStream(self.tokenizer, on_token)
        prompt_length = inputs["input_ids"].shape[1]
        stop = _StopCriteria(self.tokenizer, stop_rule(tools), prompt_length)
        processors = [_GuideProcessor(self.tokenizer, guide, prompt_length)] if guide is not None else []
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                generation_config=config,
                streamer=_GenerateStreamer(stream),
                stopping_criteria=StoppingCriteriaList([stop]),
                logits_processor=LogitsProcessorList(processors),
            )
        return stream.end()


def _is_vision_language(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_transformers(
    spec: str | Path,
    adapter: str | Path | None = None,
    device: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    allow_download: bool = False,
) -> TransformersBackend:
    """A local transformers chat model (a folder with config.json, weights and a tokenizer or
    processor with a chat template), optionally with a LoRA adapter folder on top.

    device / dtype: default CUDA + bf16 (fp16 where the GPU lacks bf16) when available, else CPU +
    float32. allow_download: let `spec` be a hub id and fetch what is not cached.
    """
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if path.is_dir():
        source = str(path)
    elif allow_download:
        source = str(spec)
    else:
        raise ModelNotAvailableError(
            f"no model folder at {spec}: pass a local folder holding config.json and the weights (for "
            "example one made by save_pretrained), or allow downloads (allow_download=True) to fetch a hub id"
        )
    local = {"local_files_only": not allow_download}
    try:
        config = AutoConfig.from_pretrained(source, **local)
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(
            f"cannot read a transformers model config from {source}: {error}"
        ) from error

    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    placement = {"device_map": {"": device}} if device != "cpu" else {}
    vision = _is_vision_language(config.model_type)
    if vision:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(source, **local)
        tokenizer = processor.tokenizer
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **placement, **local)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        processor = None
        tokenizer = AutoTokenizer.from_pretrained(source, **local)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement, **local)
    if not (processor or tokenizer).chat_template:
        raise ModelNotAvailableError(
            f"{source} has no chat template; use an instruction-tuned (chat) model, or add its template "
            "as chat_template.jinja in the model folder"
        )
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelNotAvailableError(f"no LoRA adapter at {adapter} (expected adapter_config.json there)")
        from peft import PeftModel

        # Merged into the base weights: inference then runs at the base model's speed.
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.to(device).eval()

    support = TemplateSupport.of((processor or tokenizer).chat_template)
    info = ModelInfo(
        backend="transformers",
        base_model=source,
        adapter=str(adapter) if adapter is not None else None,
        vision=f"{config.model_type} (through its processor)" if vision else None,
        details={
            "model_type": config.model_type,
            "architecture": type(model).__name__,
            "images": "passed to the model's processor" if vision else "ignored: text-only model",
            "tools": "chat template" if support.tools else "system-message block (the template has no tools)",
            "tool_results": "tool role" if support.tool_role else "user turns labelled with the tool name",
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
        },
    )
    return TransformersBackend(model, tokenizer, processor, info)
