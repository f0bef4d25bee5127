"""The `local` prompt enhancer on the tiny pipeline's Qwen3 (random weights: its words are noise, so these check the
mechanics): the chat template with the system turn and thinking off, greedy and bounded, the stop between tokens,
and the pipeline's encoding through a view that shares the whole LM's weights, bit for bit what truncation gives."""

from __future__ import annotations

from typing import Any

import pytest

from core import enhance
from core.settings import Settings

TOKENS = 6  # new tokens per rewrite here: the tiny model still takes ~0.1 s a token on a loaded 2-core machine


def klein(enhancer: str) -> Any:
    from models.klein_pipeline import KleinPipeline
    from models.tiny import build_tiny_pipeline

    settings = Settings(enhancer=enhancer, enhancer_max_tokens=TOKENS, warmup_sizes=[], attention_backend="native")
    return KleinPipeline("tiny", "cpu", settings, pipe=build_tiny_pipeline())


@pytest.fixture(scope="module")
def local() -> Any:
    return klein("local")


def enhancer(pipeline: Any) -> Any:
    from models.enhancer import LocalEnhancer

    return LocalEnhancer(pipeline.language_model, pipeline.pipe.tokenizer, TOKENS, "tiny")


def test_encoding_reads_a_view_of_the_whole_lm_bit_exactly(local: Any) -> None:
    import numpy as np
    import torch

    from models.optimize import SkippedLogits

    lm, encoder = local.language_model, local.pipe.text_encoder
    assert encoder is not lm and isinstance(encoder.lm_head, SkippedLogits) and lm.lm_head.weight.numel() > 0
    assert len(lm.model.layers) == lm.config.num_hidden_layers == 28 and encoder.config.num_hidden_layers == 28
    # Every weight of the view is the LM's own tensor: nothing copied.
    own = {p.data_ptr() for p in lm.parameters()}
    assert {p.data_ptr() for p in encoder.parameters()} <= own
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # tied: no extra weights
    assert local.speedups.outcomes["prompt_enhancer"].startswith("local: all 28 layers")

    truncated = klein("off")  # truncation proper, as without the enhancer
    assert truncated.language_model is None
    cpu = torch.device("cpu")
    with torch.inference_mode():
        a, _ = local.pipe.encode_prompt("a red fox", cpu, 1, max_sequence_length=64)
        b, _ = truncated.pipe.encode_prompt("a red fox", cpu, 1, max_sequence_length=64)
    assert torch.equal(a, b)
    from models.klein import GenerationParams

    params = GenerationParams(
        prompt="a red fox", width=64, height=64, num_inference_steps=2, guidance_scale=1.0, seed=7,
        output_format="png", output_quality=100,
    )  # fmt: skip
    assert np.array_equal(np.asarray(local.generate(params)[0]), np.asarray(truncated.generate(params)[0]))


def test_the_chat_template_renders_the_system_turn_with_thinking_off(local: Any) -> None:
    text = enhancer(local).render(enhance.messages("a red fox", "photo", references=1))
    assert text.startswith("<|im_start|>system\n" + enhance.SYSTEM_PROMPT)
    assert enhance.STYLE_NOTES["photo"] in text and "1 reference image(s)" in text
    assert text.endswith("<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_rewrites_are_greedy_bounded_and_timed(local: Any) -> None:
    rewriter = enhancer(local)
    conversation = enhance.messages("a lighthouse at night")
    first, second = rewriter.enhance(conversation), rewriter.enhance(conversation)
    assert first.prompt == second.prompt and first.new_tokens == second.new_tokens  # same settings, same words
    assert 1 <= first.new_tokens <= TOKENS and first.prompt.strip() and len(first.prompt) <= enhance.MAX_PROMPT_CHARS
    rendered = len(local.pipe.tokenizer(rewriter.render(conversation), add_special_tokens=False)["input_ids"])
    assert first.prompt_tokens == rendered
    assert first.timings["enhance_ms"] >= 0 and first.model == "tiny"


def test_a_stop_reason_ends_the_rewrite_between_tokens(local: Any) -> None:
    from models.klein_pipeline import Stop

    asked = []

    def stop() -> str | None:
        asked.append(1)
        return "canceled" if len(asked) >= 2 else None

    with pytest.raises(Stop, match="canceled"):
        enhancer(local).enhance(enhance.messages("a fox"), stop)
    assert len(asked) == 2  # asked after each token, and the second answer ended it


def test_clean_keeps_a_usable_prompt_only() -> None:
    assert enhance.clean('<think>\nhm\n</think>\n\n "A fox\x00 in snow" ') == "A fox  in snow"
    assert len(enhance.clean("x" * 5000)) == enhance.MAX_PROMPT_CHARS
    with pytest.raises(enhance.EnhanceFailed, match="no text"):
        enhance.clean(" \x01 ")
    assert enhance.mode(True) == "strict" and enhance.mode("best_effort") == "best_effort"
    assert enhance.mode(False) == "off"
