"""The prompt enhancer's cost (docs/enhancer.md): `python -m bench.enhance` (the tiny pipeline's Qwen3 on CPU) or
`python -m bench.enhance --real` (the real Qwen3-4B shapes with random weights, CUDA; bench/gpu.py runs it too).

Two figures:
- a rewrite: prefill of the conversation, then greedy decoding of `--tokens` new tokens (forced: random weights
  never stop by themselves), through the worker's own `LocalEnhancer`; ms per rewrite, ms of the prefill, decode
  tokens/s. Tiny: the rendered system prompt and a user prompt; real: `--prefill` tokens (the real tokenizer's
  length of that conversation, about 130; the tiny byte-level one would count every byte).
- the text encoder per image, 512 tokens as the pipeline pads every prompt: the worker's cut encoder (enhancer off,
  layers up to 27, no logits), the view that shares the whole LM's weights (enhancer on: the same work), and the
  whole LM as is (all layers and the 151,936-wide logits: what keeping all layers would cost without the view).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

REAL_PREFILL = 130  # tokens of the enhancer's system prompt plus a short user prompt in Qwen3's own tokenizer
SEQUENCE = 512  # the pipeline's max_sequence_length


def _median_ms(run: Callable[[], Any], iters: int, sync: Callable[[], None], cpu: list[float] | None = None) -> float:
    """Median wall milliseconds of `run`; its median process CPU milliseconds appended to `cpu` if given (on a
    shared machine the wall time is mostly waiting for a core)."""
    run()  # warm-up
    sync()
    times, cpu_times = [], []
    for _ in range(iters):
        started, cpu_started = time.perf_counter(), time.process_time()
        run()
        sync()
        times.append((time.perf_counter() - started) * 1000)
        cpu_times.append((time.process_time() - cpu_started) * 1000)
    if cpu is not None:
        cpu.append(statistics.median(cpu_times))
    return statistics.median(times)


def measure(device: Any, real: bool, tokens: int, iters: int, prefill: int = REAL_PREFILL) -> dict[str, Any]:
    import torch

    from core import enhance
    from models.enhancer import LocalEnhancer
    from models.text_encoder import encoding_view, truncate_text_encoder

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if real:
        lm, tokenizer = _real_text_encoder(device)
    else:
        from models.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
        lm, tokenizer = pipe.text_encoder.to(device).eval(), pipe.tokenizer
    rewriter = LocalEnhancer(lm, tokenizer, tokens, "bench")
    conversation = enhance.messages("a red fox in snow, morning light")
    if real:
        ids = torch.randint(1000, 100_000, (1, prefill), device=device)
    else:
        ids = tokenizer(rewriter.render(conversation), return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids.to(device)
    mask = torch.ones_like(ids)

    def generate(new: int) -> None:
        config = copy.deepcopy(rewriter.generation)  # the worker's greedy settings, exactly `new` new tokens
        config.max_new_tokens = config.min_new_tokens = new
        with torch.inference_mode():
            lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    cpu: list[float] = []
    rewrite_ms = _median_ms(lambda: generate(tokens), iters, sync, cpu)
    prefill_ms = _median_ms(lambda: generate(1), iters, sync, cpu)
    figures: dict[str, Any] = {
        "mode": "real Qwen3-4B shapes, random weights" if real else "tiny Qwen3 (28 layers × 8 wide), random weights",
        "device": str(device),
        "prefill_tokens": int(ids.shape[1]),
        "new_tokens": tokens,
        "rewrite_ms": round(rewrite_ms, 1),
        "prefill_ms": round(prefill_ms, 1),
        "decode_tokens_per_s": round((tokens - 1) / max(rewrite_ms - prefill_ms, 1e-6) * 1000, 1),
        "rewrite_cpu_ms": round(cpu[0], 1),
        "decode_tokens_per_cpu_s": round((tokens - 1) / max(cpu[0] - cpu[1], 1e-6) * 1000, 1),
    }

    low, high = (1000, 100_000) if real else (0, 256)  # token ids of the vocabulary (the tiny one: bytes)
    encode_ids = torch.randint(low, high, (1, SEQUENCE), device=device)

    def encoder(model: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(input_ids=encode_ids, output_hidden_states=True, use_cache=False)

        return run

    view = encoding_view(lm)
    figures["encode_ms_view"] = round(_median_ms(encoder(view), iters, sync), 2)
    figures["encode_ms_whole_lm"] = round(_median_ms(encoder(lm), iters, sync), 2)
    del view
    truncate_text_encoder(lm)  # last: it cuts `lm` itself
    figures["encode_ms_truncated"] = round(_median_ms(encoder(lm), iters, sync), 2)
    if device.type == "cuda":
        figures["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return figures


def _real_text_encoder(device: Any) -> tuple[Any, Any]:
    """Qwen3-4B's architecture (bench/flops.py) built on the device in bf16, random weights, LM head tied."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bench.flops import REAL_TEXT_ENCODER
    from bench.real_model import _no_init, _random_weights
    from models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    with torch.device(device), _no_init():
        lm: Any = Qwen3ForCausalLM(Qwen3Config(**REAL_TEXT_ENCODER, pad_token_id=tokenizer.pad_token_id))
    lm.tie_weights()
    _random_weights(lm, torch.Generator(device).manual_seed(0))
    return lm.to(torch.bfloat16).eval(), tokenizer


def table(figures: dict[str, Any]) -> str:
    f = figures
    return "\n".join(
        [
            f"# prompt enhancer: {f['mode']} on {f['device']}",
            f"rewrite: {f['prefill_tokens']} prefill + {f['new_tokens']} new tokens: {f['rewrite_ms']} ms "
            f"(prefill {f['prefill_ms']} ms, decode {f['decode_tokens_per_s']} tokens/s); process CPU "
            f"{f['rewrite_cpu_ms']} ms, {f['decode_tokens_per_cpu_s']} tokens per CPU second",
            f"text encoder per image ({SEQUENCE} tokens): cut {f['encode_ms_truncated']} ms | view of the whole LM "
            f"(enhancer on) {f['encode_ms_view']} ms | whole LM as is (all layers + logits) "
            f"{f['encode_ms_whole_lm']} ms",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="the real Qwen3-4B shapes (CUDA)")
    parser.add_argument("--device", help="default: cuda with --real, else cpu")
    parser.add_argument("--tokens", type=int, help="new tokens per rewrite (120 real, 16 tiny)")
    parser.add_argument("--prefill", type=int, default=REAL_PREFILL, help="--real: prompt tokens")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if args.real else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run without --real for the tiny model on CPU", file=sys.stderr)
        return 2
    figures = measure(device, args.real, args.tokens or (120 if args.real else 16), args.iters, args.prefill)
    print(table(figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
