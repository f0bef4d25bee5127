"""The `local` prompt enhancer: the worker's own Qwen3 text encoder run as the causal LM it is (`Qwen3ForCausalLM`,
LM head tied to the embeddings), with its chat template in non-thinking mode, greedy and bounded. Imported by
workers only (torch lives here)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from core.enhance import Enhanced, clean
from models.klein_pipeline import Stop


class _StopWhenTold(StoppingCriteria):
    """Asked after every new token: a reason (canceled, timed out) raises Stop out of `generate`."""

    def __init__(self, stop_reason: Callable[[], str | None]) -> None:
        self.stop_reason = stop_reason

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        reason = self.stop_reason()
        if reason is not None:
            raise Stop(reason)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class LocalEnhancer:
    """Rewrites prompts with `language_model` (the whole Qwen3 whose cut view the pipeline encodes with) and the
    pipeline's tokenizer. `model` is the name reported with each rewrite."""

    def __init__(self, language_model: Any, tokenizer: Any, max_new_tokens: int, model: str) -> None:
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.model = model
        # Greedy, whatever the checkpoint's generation_config.json suggests (Qwen3 ships sampling defaults).
        self.generation = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def render(self, conversation: list[dict[str, str]]) -> str:
        """The text the model reads: Qwen3's chat template, generation prompt added, thinking off."""
        text: str = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        return text

    def enhance(
        self, conversation: list[dict[str, str]], stop_reason: Callable[[], str | None] = lambda: None
    ) -> Enhanced:
        started = time.perf_counter()
        inputs = self.tokenizer(self.render(conversation), return_tensors="pt", add_special_tokens=False)
        device = self.language_model.device
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        prompt_tokens = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            output = self.language_model.generate(
                **inputs,
                generation_config=self.generation,
                stopping_criteria=StoppingCriteriaList([_StopWhenTold(stop_reason)]),
            )
        new = output[0, prompt_tokens:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Enhanced(
            prompt=clean(text),
            model=self.model,
            prompt_tokens=prompt_tokens,
            new_tokens=int(new.shape[0]),
            timings={"enhance_ms": round((time.perf_counter() - started) * 1000)},
        )
