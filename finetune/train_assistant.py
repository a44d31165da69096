"""LoRA instruction-tuning of the assistant's language model (and its projector), on the generations
recorded by finetune/instructions.py: each example is a prompt exactly as the agent renders it for
the backend (system prompt, tool block, conversation, observations, answer instruction) and the
teacher's output there (a tool call, or the grounded answer). The loss is on the target tokens only.

    python -m finetune.instructions --out runs/assistant_data
    python -m finetune.train_assistant --data runs/assistant_data/train.jsonl --threads 1
    python -m finetune.train_assistant --model /models/Qwen2-VL-2B-Instruct --top-layers 0 --images

`--model embedded` (default) trains SmolLM2-135M-Instruct of the embedded VLM; any other value is a
local transformers model folder (text or vision-language, through assistant/backends), trained the same
way: peft LoRA on the language model (rank, alpha, dropout and target modules configurable), the
embedded projector too when `--images` puts the images in the prompt. accelerate places it on the CPU
here and on one or many GPUs elsewhere.

On a CPU the prompts (~1,000-1,500 tokens, most of them the system prompt and tool block) cost far
more than the targets. With `--top-layers N` the adapter sits on the top N decoder layers only; the
layers below are frozen, so their outputs are computed once per example (and once per distinct
system prompt, whose keys and values every example with that prompt reuses) and cached, and each
step runs only the top layers with gradients. This is exact, not an approximation: the frozen layers
compute the same values at inference, with the adapter merged. Logits are computed at the target
positions only.

Checkpoints (`out/checkpoint.pt`: adapter, projector, optimiser, step) are written every
`--checkpoint-every` steps and at the end; a rerun with the same `--out` resumes from them. With
`--ship` the adapter goes to experts/weights/embedded_lora/ (and the projector, when trained, to
experts/weights/embedded_projector.safetensors), where the embedded backend finds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.instructions import message_from_dict, read_jsonl
from finetune.recipe import Checkpoints, RecipeConfig, parse_config, start

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "experts" / "weights"
ADAPTER_DIR = "embedded_lora"
PROJECTOR_FILE = "embedded_projector.safetensors"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class AssistantConfig(RecipeConfig):
    """LoRA instruction-tuning of the assistant (finetune/train_assistant.py)."""

    out: str = "runs/assistant"
    model: str = "embedded"  # "embedded" or a local transformers model folder
    data: str = "runs/assistant_data/train.jsonl"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ALL_TARGETS
    top_layers: int = 6  # adapter on the top N decoder layers (0: every layer); the rest frozen and cached
    images: bool = False  # images in the prompt; trains the embedded projector too
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 8
    epochs: float = 2.0
    batch: int = 4  # examples per optimiser step (gradient accumulation)
    max_length: int = 3072  # longer prompts are left out (the agent never sends them to SmolLM2)
    max_examples: int = 0  # 0: all
    max_conversations: int = 0  # 0: all; else this many conversations, drawn by seed
    max_turn: int = -1  # keep generations of turns 0..max_turn only (-1: all); follow-ups carry long history
    max_groups: int = 0  # keep conversations of the N most common system turns (image format and size) only
    max_steps: int = 0  # 0: from epochs
    max_minutes: float = 0.0  # stop (and ship) after this long; 0: no limit
    pack: bool = True  # one sequence per turn, loss on each of its targets (pack_turns)
    plan_weight: float = 1.0  # loss weight of tool-call tokens against answer tokens in a turn's sequence
    dev_fraction: float = 0.08  # conversations held out (by source image) for the eval loss
    eval_every: int = 20
    checkpoint_every: int = 10
    device: str = ""  # "" lets accelerate choose
    export: bool = False  # only write (and with --ship, ship) the adapter of the latest checkpoint in `out`


# --------------------------------------------------------------------------------------------------
# The model and its prompts


class Trainee:
    """The model being tuned and how it renders a recorded generation into token ids.

    `backend` is the inference backend itself (embedded or transformers), so prompts are rendered by
    the same code that renders them at inference."""

    def __init__(self, config: AssistantConfig, device: str) -> None:
        self.config = config
        self.device = device
        if config.model == "embedded":
            from assistant.backends.embedded import load_embedded

            # An empty weights folder: start from the base model, never from a shipped adapter.
            self.backend = load_embedded(
                device=device,
                dtype="float32",
                use_images=config.images,
                weights_dir=Path(config.out) / "no-weights",
            )
            self.backend.prefix_cache = False
            self.language_model = self.backend.model.language_model
            self.projector = self.backend.model.projector if config.images else None
            self.tokenizer = self.backend.tokenizer
            self.embedded = True
        else:
            from assistant.backends.transformers_backend import load_transformers

            self.backend = load_transformers(config.model, device=device, dtype="float32")
            self.language_model = self.backend.model
            self.projector = None
            self.tokenizer = self.backend.tokenizer
            self.embedded = False
        self.end_ids = self._end_ids()

    def _end_ids(self) -> list[int]:
        """What ends an assistant turn in this chat template (SmolLM2 and Qwen: <|im_end|>)."""
        token = "<|im_end|>" if "<|im_end|>" in self.tokenizer.get_vocab() else None
        if token:
            return [self.tokenizer.convert_tokens_to_ids(token)]
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    @property
    def sees_images(self) -> bool:
        return self.config.images if self.embedded else self.backend.sees_images

    def layers(self) -> torch.nn.ModuleList:
        inner = self._inner()
        return inner.layers

    def _inner(self) -> torch.nn.Module:
        """The decoder body (embeddings, layers, norm) under the peft wrapper and the LM head."""
        model = self.language_model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        model = getattr(model, "model", model)
        if not hasattr(model, "layers") and hasattr(model, "language_model"):  # a VLM's text model
            model = model.language_model
        return model

    def add_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        layers = len(self.layers())
        top = self.config.top_layers
        lora = LoraConfig(
            r=self.config.rank,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=list(self.config.targets),
            layers_to_transform=list(range(layers - top, layers)) if 0 < top < layers else None,
            task_type="CAUSAL_LM",
        )
        self.language_model.requires_grad_(False)
        self.language_model = get_peft_model(self.language_model, lora)
        if self.embedded:
            self.backend.model.language_model = self.language_model
        if self.projector is not None:
            self.projector.requires_grad_(True)

    def trainable(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.language_model.parameters() if p.requires_grad]
        if self.projector is not None:
            params += list(self.projector.parameters())
        return params

    def encode(self, record: dict[str, Any], tools: Sequence[dict]) -> Example:
        """A recorded generation as (prompt, target) token ids, exactly as the backend renders it."""
        pixels = None
        if self.sees_images and any(m.get("images") for m in record["messages"]):
            from experts.image import load_image

            pixels = load_image(record["image"]).display
        messages = [message_from_dict(m, pixels) for m in record["messages"]]
        target = self.tokenizer(record["target"], add_special_tokens=False)["input_ids"] + self.end_ids
        group = f"{record.get('conversation', record['id'])}|{record.get('turn', 0)}"
        plan = record["target"].lstrip().startswith("<tool_call>")
        if self.embedded:
            segments, images = self.backend.prompt_segments(messages, tools)
            segments = [s.cpu() for s in segments]
            return Example(record["id"], segments, list(images), target, None, group=group, plan=plan)
        inputs = self.backend.inputs(messages, tools)
        ids = inputs.pop("input_ids")[0].cpu()
        inputs.pop("attention_mask", None)
        return Example(record["id"], [ids], [], target, dict(inputs), plan=plan)

    # -- forward passes ---------------------------------------------------------------------------

    def loss(self, example: Example) -> torch.Tensor:
        """Cross-entropy over the target tokens, the whole model run with gradients."""
        target = torch.tensor(example.target, device=self.device)
        if self.embedded:
            segments = [s.to(self.device) for s in example.segments]
            segments[-1] = torch.cat([segments[-1], target[:-1]])
            embeds = self.backend.model.inputs_embeds(segments, example.images)
            hidden = self._inner()(inputs_embeds=embeds).last_hidden_state
            if example.earlier:
                inputs, labels = example.positions()
                return self._loss_at(hidden[0], inputs, labels, example.weights(self.config.plan_weight))
            return self._target_loss(hidden[0], target)
        prompt = example.segments[0].to(self.device)
        ids = torch.cat([prompt, target[:-1]])[None]
        extra = {}
        for key, value in (example.extra or {}).items():
            value = value.to(self.device)
            if value.dim() == 2 and value.shape == (1, len(prompt)):  # per-token inputs: none for targets
                value = torch.cat([value, value.new_zeros((1, len(target) - 1))], dim=1)
            extra[key] = value
        output = self.language_model(input_ids=ids, **extra)
        logits = output.logits[0, -len(example.target) :]
        return torch.nn.functional.cross_entropy(logits.float(), target)

    def _loss_at(
        self, hidden: torch.Tensor, inputs: Sequence[int], labels: Sequence[int], weights: Sequence[float]
    ) -> torch.Tensor:
        """Cross-entropy at these positions, the weighted mean over their labels."""
        head = self.language_model.get_output_embeddings()
        logits = head(hidden[torch.tensor(list(inputs), device=hidden.device)])
        losses = torch.nn.functional.cross_entropy(
            logits.float(), torch.tensor(list(labels), device=hidden.device), reduction="none"
        )
        weights = torch.tensor(list(weights), dtype=losses.dtype, device=hidden.device)
        return (losses * weights).sum() / weights.sum()

    def _target_loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits only where a target token is predicted: the last len(target) positions."""
        head = self.language_model.get_output_embeddings()
        logits = head(hidden[-len(target) :])
        return torch.nn.functional.cross_entropy(logits.float(), target)


@dataclasses.dataclass
class Example:
    id: str
    segments: list[torch.Tensor]  # prompt token ids (embedded: split where the images go)
    images: list[np.ndarray]
    target: list[int]
    extra: dict[str, torch.Tensor] | None  # a transformers VLM's pixel inputs
    # Earlier targets of the same turn inside this prompt (start, end in the prompt's ids): a tool call
    # the model wrote at an earlier step is also trained here, where its prompt is a prefix (pack_turns).
    earlier: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    group: str = ""  # (conversation, turn): the examples that pack_turns may merge
    plan: bool = False  # the target is a tool call (every earlier target of a turn is one)

    @property
    def length(self) -> int:
        return sum(len(s) for s in self.segments) + len(self.target)

    def positions(self) -> tuple[list[int], list[int]]:
        """(positions whose output predicts a target token, those tokens), in the sequence prompt +
        target[:-1] (single-segment prompts)."""
        ids = self.segments[0].tolist()
        inputs, labels = [], []
        for first, stop in self.earlier:
            inputs += range(first - 1, stop - 1)
            labels += ids[first:stop]
        inputs += range(len(ids) - 1, len(ids) - 1 + len(self.target))
        labels += self.target
        return inputs, labels

    def weights(self, plan_weight: float) -> list[float]:
        """The loss weight of each label of positions(): plan_weight on tool calls, 1 on the answer."""
        planned = sum(stop - first for first, stop in self.earlier)
        return [plan_weight] * planned + [plan_weight if self.plan else 1.0] * len(self.target)


def pack_turns(examples: Sequence[Example]) -> list[Example]:
    """Merge each turn's generations into its last one where the earlier prompts and targets are a
    prefix of it (the tool calls of a turn are in the prompt of its answer): one sequence per turn,
    with the loss on every target in it, as multi-turn fine-tuning does; fewer tokens to compute."""
    by_group: dict[str, list[Example]] = {}
    for example in examples:
        by_group.setdefault(example.group or example.id, []).append(example)
    packed = []
    for members in by_group.values():
        last = members[-1]
        if len(last.segments) != 1:
            packed += members
            continue
        ids = last.segments[0]
        earlier = []
        for example in members[:-1]:
            sequence = (
                torch.cat([example.segments[0], torch.tensor(example.target)])
                if len(example.segments) == 1
                else None
            )
            if (
                sequence is not None
                and len(sequence) <= len(ids)
                and torch.equal(ids[: len(sequence)], sequence)
            ):
                earlier.append((len(example.segments[0]), len(sequence)))
            else:
                packed.append(example)
        packed.append(dataclasses.replace(last, earlier=earlier))
    return packed


class FrozenLowerLayers:
    """Outputs of the frozen lower decoder layers, cached per example, and the top layers run from them.

    The system turn (everything before the first user turn: system prompt, tool block) is the same
    for every example that shares its text; it goes through the lower layers once per distinct text,
    and its keys and values are reused while each example's own tokens (the rest of the prompt and
    the target) go through them once. A training step takes examples of one system turn: the turn
    runs through the top layers once, without gradients (its keys and values are what the adapter
    makes of it now, as at inference), then each example's own tokens with gradients."""

    def __init__(self, trainee: Trainee, lower: int) -> None:
        self.trainee = trainee
        self.lower = lower
        self.hidden: dict[str, torch.Tensor] = {}
        self.prefixes: dict[str, torch.Tensor] = {}
        self.group: dict[str, str] = {}
        self.cut: dict[str, int] = {}

    def key(self, example: Example) -> str:
        return self.group[example.id]

    @torch.no_grad()
    def fill(self, examples: Sequence[Example], progress: bool = True, deadline: float = 0.0) -> None:
        """Cache the lower layers' outputs of these examples (until `deadline`, a perf_counter time,
        when given: examples left uncached are then left out of training)."""
        from tqdm import tqdm

        start_id = self.trainee.tokenizer.convert_tokens_to_ids("<|im_start|>")
        groups: dict[str, list[tuple[Example, int]]] = {}
        for example in examples:
            ids = example.segments[0].tolist()
            starts = [i for i, t in enumerate(ids) if t == start_id]
            cut = starts[1] if len(starts) > 1 else 0
            key = hashlib.sha1(np.asarray(ids[:cut], dtype=np.int64).tobytes()).hexdigest()
            groups.setdefault(key, []).append((example, cut))
        bar = tqdm(total=len(examples), desc="caching frozen layers", unit="ex", disable=not progress)
        for key, members in groups.items():
            cut = members[0][1]
            cache = None
            if cut:
                cache, self.prefixes[key] = self._run(members[0][0].segments[0][:cut], None)
            for example, _ in members:
                if deadline and time.perf_counter() > deadline:
                    break
                ids = torch.cat([example.segments[0][cut:], torch.tensor(example.target[:-1])])
                _, self.hidden[example.id] = self._run(ids, _copy_cache(cache) if cache is not None else None)
                self.group[example.id] = key if cut else ""
                self.cut[example.id] = cut
                bar.update()
        bar.close()

    def _run(self, ids: torch.Tensor, cache: Any) -> tuple[Any, torch.Tensor]:
        """The lower layers over `ids` after the cached tokens: (cache, hidden states at their top)."""
        from transformers import DynamicCache

        trainee = self.trainee
        inner = trainee._inner()
        config = inner.config
        captured: list[torch.Tensor] = []
        hook = inner.norm.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        total = config.num_hidden_layers
        try:
            config.num_hidden_layers = self.lower
            cache = cache if cache is not None else DynamicCache(config=config)
            inner(input_ids=ids[None].to(trainee.device), past_key_values=cache, use_cache=True)
        finally:
            config.num_hidden_layers = total
            hook.remove()
        return cache, captured[0][0].detach().cpu()

    def _top(self, hidden: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
        """The top layers over hidden states at positions start.., attending to `cache` before them."""
        inner = self.trainee._inner()
        device = self.trainee.device
        length = hidden.shape[1]
        positions = torch.arange(start, start + length, device=device)[None]
        position_embeddings = inner.rotary_emb(hidden, positions)
        mask = None
        if start:  # causal over the new tokens, everything cached before them visible
            mask = torch.ones(length, start + length, dtype=torch.bool, device=device).tril(start)[None, None]
        for layer in inner.layers[self.lower :]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    def prefix_cache(self, key: str) -> tuple[Any, int]:
        """The system turn's keys and values in the top layers, as the adapter makes them now."""
        from transformers import DynamicCache

        if not key:
            return None, 0
        prefix = self.prefixes[key]
        cache = DynamicCache(config=self.trainee._inner().config)
        with torch.no_grad():
            self._top(prefix[None].to(self.trainee.device), 0, cache)
        return cache, prefix.shape[0]

    def loss(self, example: Example, prefix: tuple[Any, int] | None = None) -> torch.Tensor:
        cache, start = prefix if prefix is not None else self.prefix_cache(self.key(example))
        hidden = self.hidden[example.id][None].to(self.trainee.device)
        cache = _copy_cache(cache) if cache is not None else None
        hidden = self.trainee._inner().norm(self._top(hidden, start, cache))
        inputs, labels = example.positions()
        cut = self.cut[example.id]
        weights = example.weights(self.trainee.config.plan_weight)
        return self.trainee._loss_at(hidden[0], [i - cut for i in inputs], labels, weights)


def _chunks(examples: Sequence[Example], size: int, key) -> list[list[Example]]:
    """Examples in batches of one group each, in a fixed order (for the dev loss)."""
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(key(example), []).append(example)
    return [
        members[i : i + size] for _, members in sorted(groups.items()) for i in range(0, len(members), size)
    ]


def _copy_cache(cache: Any) -> Any:
    import copy

    return copy.deepcopy(cache)


# --------------------------------------------------------------------------------------------------
# Data


def dev_split(records: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, dev): whole source images go to dev by a seeded hash, so dev conversations are unseen."""
    sources = sorted({r["source"] for r in records})
    if fraction <= 0 or len(sources) < 2:
        return list(records), []
    ranked = sorted(sources, key=lambda s: hashlib.md5(f"{seed}|{s}".encode()).hexdigest())
    dev = set(ranked[: max(1, round(len(sources) * fraction))])
    return [r for r in records if r["source"] not in dev], [r for r in records if r["source"] in dev]


def _images_line(record: dict) -> str:
    system = record["messages"][0]["content"] if record["messages"] else ""
    return next((line for line in system.splitlines() if line.startswith("Images in this")), "")


def choose_conversations(records: Sequence[dict], count: int, groups: int, seed: int) -> list[dict]:
    """Records of `count` conversations (0: all), drawn by seed in turn from the `groups` most common
    system turns (0: all). Each distinct system turn costs one pass through the frozen layers, so on
    a small CPU budget fewer of them leave more for the conversations themselves."""
    by_line: dict[str, list[str]] = {}
    for record in records:
        members = by_line.setdefault(_images_line(record), [])
        if record["conversation"] not in members:
            members.append(record["conversation"])
    ranked = sorted(by_line.items(), key=lambda item: (-len(item[1]), item[0]))
    kept = [sorted(members) for _, members in (ranked[:groups] if groups else ranked)]
    rng = random.Random(seed)
    for members in kept:
        rng.shuffle(members)
    order = [c for round_ in itertools.zip_longest(*kept) for c in round_ if c is not None]
    chosen = set(order[:count] if count else order)
    return [r for r in records if r["conversation"] in chosen]


def tools_for(experts: Sequence[str]) -> list[dict]:
    from assistant.tools import tool_schemas

    return tool_schemas(experts)


def encode_all(trainee: Trainee, records: Sequence[dict], max_length: int) -> list[Example]:
    tools_cache: dict[tuple[str, ...], list[dict]] = {}
    examples = []
    for record in records:
        key = tuple(record["experts"])
        tools = tools_cache.setdefault(key, tools_for(key))
        example = trainee.encode(record, tools)
        if example.length > max_length:
            log.warning(
                "%s: %d tokens, over --max-length %d; left out", record["id"], example.length, max_length
            )
            continue
        examples.append(example)
    return examples


# --------------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, total: int, config: AssistantConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(config: AssistantConfig, records: Sequence[dict] | None = None) -> dict[str, Any]:
    """Run the recipe; returns a summary (steps, losses, seconds, where the adapter went)."""
    from tqdm import tqdm

    began = time.perf_counter()
    accelerator = start(config)
    device = config.device or str(accelerator.device)
    records = list(records if records is not None else read_jsonl(config.data))
    if config.max_turn >= 0:
        records = [r for r in records if r["turn"] <= config.max_turn]
    if config.max_conversations or config.max_groups:
        records = choose_conversations(records, config.max_conversations, config.max_groups, config.seed)
    if config.max_examples:
        rng = random.Random(config.seed)
        records = rng.sample(records, min(config.max_examples, len(records)))
    train_records, dev_records = dev_split(records, config.dev_fraction, config.seed)
    trainee = Trainee(config, device)
    trainee.add_lora()
    examples = encode_all(trainee, train_records, config.max_length)
    dev = encode_all(trainee, dev_records, config.max_length)
    if config.pack:
        examples, dev = pack_turns(examples), pack_turns(dev)
    log.info(
        "%d training sequences (%d targets), %d dev sequences",
        len(examples),
        sum(1 + len(e.earlier) for e in examples),
        len(dev),
    )
    if not examples:
        raise ValueError(f"no training examples in {config.data} (after --max-length {config.max_length})")

    layers = len(trainee.layers())
    cached = None
    if trainee.embedded and not config.images and 0 < config.top_layers < layers:
        cached = FrozenLowerLayers(trainee, layers - config.top_layers)
        # On a time budget, caching may take at most 60% of it; what is not cached by then is left out.
        deadline = began + 0.6 * config.max_minutes * 60 if config.max_minutes else 0.0
        cached.fill(dev + examples, deadline=deadline)
        examples = [e for e in examples if e.id in cached.hidden]
        dev = [e for e in dev if e.id in cached.hidden]
        log.info("cached %d training and %d dev sequences", len(examples), len(dev))
    optimizer = torch.optim.AdamW(trainee.trainable(), lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(trainee.language_model, optimizer)

    def group_of(example: Example) -> str:
        return cached.key(example) if cached is not None else ""

    def batches(epoch: int) -> list[list[Example]]:
        """The epoch's batches, each from one system turn (so it runs through the top layers once)."""
        rng = random.Random(config.seed * 1000 + epoch)
        groups: dict[str, list[Example]] = {}
        for example in examples:
            groups.setdefault(group_of(example), []).append(example)
        chunks = []
        for key in sorted(groups):
            members = groups[key]
            rng.shuffle(members)
            chunks += [members[i : i + config.batch] for i in range(0, len(members), config.batch)]
        rng.shuffle(chunks)
        return chunks

    def batch_losses(batch: Sequence[Example], backward: bool) -> list[float]:
        values = []
        prefixes: dict[str, Any] = {}
        for example in batch:
            if cached is not None:
                key = group_of(example)
                if key not in prefixes:
                    prefixes[key] = cached.prefix_cache(key)
                loss = cached.loss(example, prefixes[key])
            else:
                loss = trainee.loss(example)
            if backward:
                accelerator.backward(loss / len(batch))
            values.append(float(loss.detach()))
        return values

    def dev_loss() -> float | None:
        if not dev:
            return None
        model.eval()
        with torch.no_grad():
            value = float(
                np.mean([v for b in _chunks(dev, config.batch, group_of) for v in batch_losses(b, False)])
            )
        model.train()
        return value

    per_epoch = len(batches(0))
    total = config.max_steps or max(1, round(config.epochs * per_epoch))
    checkpoints = Checkpoints(config.out)
    state = checkpoints.load(config.resume)
    step, history = 0, {"train": [], "dev": []}
    if state is not None:
        _load_trainable(trainee, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        log.info("resumed at step %d of %d", step, total)

    if step == 0 and dev:
        history["dev"].append((0, dev_loss()))
    model.train()
    bar = tqdm(total=total, initial=step, desc="training", unit="step")
    stopped = "done"
    while step < total:
        epoch, index = divmod(step, per_epoch)
        batch = batches(epoch)[index]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, config)
        losses = batch_losses(batch, backward=True)
        torch.nn.utils.clip_grad_norm_(trainee.trainable(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["train"].append((step, float(np.mean(losses))))
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        if config.eval_every and step % config.eval_every == 0 and step < total:
            history["dev"].append((step, dev_loss()))
            bar.write(f"step {step}: dev loss {history['dev'][-1][1]}")
        if step % config.checkpoint_every == 0 or step == total:
            checkpoints.save(
                trainable=_trainable_state(trainee),
                optimizer=optimizer.state_dict(),
                step=step,
                history=history,
            )
        if config.max_minutes and time.perf_counter() - began > config.max_minutes * 60:
            stopped = f"time limit ({config.max_minutes} min)"
            checkpoints.save(
                trainable=_trainable_state(trainee),
                optimizer=optimizer.state_dict(),
                step=step,
                history=history,
            )
            break
    bar.close()
    history["dev"].append((step, dev_loss()))
    adapter_dir = Path(config.out) / "adapter"
    save_adapter(trainee, adapter_dir)
    summary = {
        "steps": step,
        "total_steps": total,
        "stopped": stopped,
        "examples": len(examples),
        "targets": sum(1 + len(e.earlier) for e in examples),
        "dev_examples": len(dev),
        "train_loss_last": history["train"][-1][1] if history["train"] else None,
        "dev_loss": history["dev"],
        "minutes": round((time.perf_counter() - began) / 60, 1),
        "adapter": str(adapter_dir),
        "trainable_parameters": sum(p.numel() for p in trainee.trainable()),
    }
    (Path(config.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    if config.ship:
        ship(adapter_dir, config)
    return summary


def _trainable_state(trainee: Trainee) -> dict[str, torch.Tensor]:
    state = {
        f"lm.{name}": p.detach().cpu().clone()
        for name, p in trainee.language_model.named_parameters()
        if p.requires_grad
    }
    if trainee.projector is not None:
        state |= {
            f"projector.{k}": v.detach().cpu().clone() for k, v in trainee.projector.state_dict().items()
        }
    return state


def _load_trainable(trainee: Trainee, state: dict[str, torch.Tensor]) -> None:
    params = dict(trainee.language_model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("lm."):
                params[key[3:]].copy_(value)
    if trainee.projector is not None:
        trainee.projector.load_state_dict(
            {k[len("projector.") :]: v for k, v in state.items() if k.startswith("projector.")}
        )


def save_adapter(trainee: Trainee, folder: Path) -> None:
    """The adapter in peft's layout (adapter_config.json + adapter_model.safetensors), and the projector
    beside it when it was trained."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = trainee.language_model
    if trainee.embedded:
        from assistant.backends.embedded import BASE_MODEL

        model.peft_config["default"].base_model_name_or_path = BASE_MODEL  # not this machine's cache path
    model.save_pretrained(folder, save_embedding_layers=False)  # no hub lookup: the embeddings are frozen
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty card; the project's card is elsewhere
    _sort_target_modules(folder / "adapter_config.json")
    if trainee.projector is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in trainee.projector.state_dict().items()}
        save_file(state, folder / PROJECTOR_FILE)


def _sort_target_modules(config_file: Path) -> None:
    """peft writes target_modules from a set, in an order that changes from run to run; sorted, the
    same adapter gives the same file."""
    settings = json.loads(config_file.read_text())
    if isinstance(settings.get("target_modules"), list):
        settings["target_modules"] = sorted(settings["target_modules"])
    config_file.write_text(json.dumps(settings, indent=2, sort_keys=True))


def ship(adapter_dir: Path, config: AssistantConfig) -> Path:
    """Copy the adapter (and projector) to experts/weights/, where the embedded backend finds them."""
    if config.model != "embedded":
        raise ValueError(
            "only the embedded model's adapter ships with the package; yours is in " + str(adapter_dir)
        )
    target = WEIGHTS_DIR / ADAPTER_DIR
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(adapter_dir / name, target / name)
    if (adapter_dir / PROJECTOR_FILE).is_file():
        shutil.copyfile(adapter_dir / PROJECTOR_FILE, WEIGHTS_DIR / PROJECTOR_FILE)
    return target


def export(config: AssistantConfig) -> dict[str, Any]:
    """The adapter (and projector) of the latest checkpoint, written without training: for a run
    stopped early, or one whose adapter folder was lost."""
    state = Checkpoints(config.out).load()
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {config.out}; train first")
    if config.threads:
        torch.set_num_threads(config.threads)
    trainee = Trainee(config, config.device or "cpu")
    trainee.add_lora()
    _load_trainable(trainee, state["trainable"])
    adapter_dir = Path(config.out) / "adapter"
    save_adapter(trainee, adapter_dir)
    if config.ship:
        ship(adapter_dir, config)
    return {"steps": state["step"], "history": state["history"], "adapter": str(adapter_dir)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_config(AssistantConfig, argv)
    summary = export(config) if config.export else train(config)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
