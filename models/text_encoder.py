"""The Qwen3 text encoder's side of the pipeline: which hidden states it must provide, truncating it to them,
and an LRU of prompt embeddings in front of `Flux2KleinPipeline.encode_prompt`."""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.klein import TEXT_ENCODER_OUT_LAYERS
from models.registry import SPEC_FILE


def encoder_layers(text_encoder: Any) -> int:
    return len(text_encoder.model.layers)


def check_out_layers(text_encoder: Any, out_layers: Sequence[int], joint_attention_dim: int | None = None) -> None:
    """Raise ValueError unless the encoder has every hidden state in `out_layers` and their stack is as wide as the
    transformer's text input. `output.hidden_states` has layers + 1 entries: 0 is the embeddings, k the output of
    layer k-1 (the last one after the final norm)."""
    layers = encoder_layers(text_encoder)
    missing = [k for k in out_layers if not 0 <= k <= layers]
    if missing:
        raise ValueError(
            f"the text encoder has {layers} layers (hidden states 0–{layers}) but the model spec reads hidden states "
            f"{tuple(out_layers)}: {missing} do not exist. A cut-depth encoder names the ones it has in the model "
            f'folder\'s {SPEC_FILE}, e.g. {{"text_encoder_out_layers": [0, 1, 2]}}'
        )
    width = len(out_layers) * text_encoder.config.hidden_size
    if joint_attention_dim is not None and width != joint_attention_dim:
        raise ValueError(
            f"{len(out_layers)} text-encoder hidden states × {text_encoder.config.hidden_size} = {width}, but the "
            f"transformer's joint_attention_dim is {joint_attention_dim}: the model spec names the wrong layers"
        )


class SkippedLogits(nn.Module):
    """Stands in for the LM head: the pipeline reads hidden states only, so no logits are computed."""

    def __init__(self, original_layers: int) -> None:
        super().__init__()
        self.original_layers = original_layers  # before truncation (FLOP counts of the untruncated model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]


def truncate_text_encoder(text_encoder: Any, out_layers: Sequence[int] = TEXT_ENCODER_OUT_LAYERS) -> str:
    """Keep only the decoder layers whose hidden states the pipeline reads, and skip the logits.

    `output.hidden_states[k]` is the output of layer k-1 (index 0 is the embeddings); the last entry is
    replaced by the final-norm output. Keeping max(out_layers) + 1 layers leaves every index read
    un-normalised and computed by exactly the same ops: bit-identical prompt embeddings. An encoder without
    those hidden states is refused (ValueError), never reported as truncated.
    """
    if min(out_layers) < 0:
        raise ValueError("text encoder out layers must be non-negative to truncate")
    check_out_layers(text_encoder, out_layers)
    model = text_encoder.model
    keep = max(out_layers) + 1
    total = encoder_layers(text_encoder)
    if keep < total:
        model.layers = nn.ModuleList(list(model.layers)[:keep])
        for config in {id(c): c for c in (text_encoder.config, model.config)}.values():
            config.num_hidden_layers = keep
            if getattr(config, "layer_types", None) is not None:
                config.layer_types = list(config.layer_types)[:keep]
    if not isinstance(text_encoder.lm_head, SkippedLogits):
        text_encoder.lm_head = SkippedLogits(total)
    return f"on: {min(keep, total)} of {total} layers, no logits"


def encoding_view(language_model: Any, out_layers: Sequence[int] = TEXT_ENCODER_OUT_LAYERS) -> Any:
    """The text encoder as the pipeline reads it, cut like `truncate_text_encoder` (layers up to the last hidden
    state read, no logits), as a view of `language_model` that shares every weight: the whole causal LM stays
    intact beside it for the prompt enhancer (models/enhancer.py), and encoding costs what truncation costs.

    Shallow copies of the outer and inner modules with their own module tables and config: the decoder layers,
    embeddings and norm are the same objects (no second copy of any weight)."""
    if min(out_layers) < 0:
        raise ValueError("text encoder out layers must be non-negative to truncate")
    check_out_layers(language_model, out_layers)
    total = encoder_layers(language_model)
    keep = min(max(out_layers) + 1, total)
    inner = copy.copy(language_model.model)
    object.__setattr__(inner, "_modules", dict(language_model.model._modules))
    inner.layers = nn.ModuleList(list(language_model.model.layers)[:keep])
    config = copy.deepcopy(language_model.model.config)
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:keep]
    inner.config = config
    view = copy.copy(language_model)
    object.__setattr__(view, "_modules", dict(language_model._modules))
    view.model = inner
    shared = language_model.config is language_model.model.config
    view.config = config if shared else copy.deepcopy(language_model.config)
    view.config.num_hidden_layers = keep
    view.lm_head = SkippedLogits(total)
    return view


class PromptCache:
    """An LRU of prompt embeddings in front of `Flux2KleinPipeline.encode_prompt` (same signature).

    The key is everything that determines the text encoder's output: the prompts, the sequence length,
    the hidden-state layers, the device and the dtype. The cached value is the embedding for one image per
    prompt; `num_images_per_prompt` is applied by the pipeline's own `encode_prompt` on every call, so
    the result is identical to an uncached call.

    Installed as the pipeline's `encode_prompt`, it holds the pipeline weakly and its class's function, not a
    bound method: no reference cycle, so a dropped pipeline frees its memory at once, without a gc pass.
    """

    def __init__(self, pipe: Any, size: int) -> None:
        self._pipe = weakref.ref(pipe)
        self.size = size
        self.encode: Any = type(pipe).encode_prompt  # the class's function; called with the pipeline
        self.entries: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def pipe(self) -> Any:
        pipe = self._pipe()
        if pipe is None:
            raise ReferenceError("the pipeline of this prompt cache is gone")
        return pipe

    def __len__(self) -> int:
        return len(self.entries)

    def __call__(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = TEXT_ENCODER_OUT_LAYERS,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        if prompt_embeds is None:
            prompts = [""] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
            device = device or pipe._execution_device
            key = (
                tuple(prompts),
                max_sequence_length,
                tuple(text_encoder_out_layers),
                str(device),
                str(pipe.text_encoder.dtype),
            )
            prompt_embeds = self.entries.get(key)
            if prompt_embeds is not None:
                self.hits += 1
                self.entries.move_to_end(key)
            else:
                self.misses += 1
                prompt_embeds, _ = self.encode(
                    pipe,
                    prompt=prompts,
                    device=device,
                    num_images_per_prompt=1,
                    max_sequence_length=max_sequence_length,
                    text_encoder_out_layers=text_encoder_out_layers,
                )
                self.entries[key] = prompt_embeds
                while len(self.entries) > self.size:
                    self.entries.popitem(last=False)
            prompt = prompts
        return self.encode(
            pipe,
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            prompt_embeds=prompt_embeds,
            max_sequence_length=max_sequence_length,
            text_encoder_out_layers=text_encoder_out_layers,
        )


def install_prompt_cache(pipe: Any, size: int) -> PromptCache:
    current = pipe.encode_prompt
    if isinstance(current, PromptCache):
        current.size = size
        return current
    cache = PromptCache(pipe, size)
    pipe.encode_prompt = cache
    return cache
