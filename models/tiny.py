"""A tiny, randomly initialised FLUX.2 [klein] pipeline, built offline.

Same classes and call path as the real 4B checkpoint, about 0.7 MB on disk, so the
real loading code (`from_pretrained`) and the worker can be tested on any CPU.
Nothing here downloads anything: the tokenizer is a byte-level BPE built in code.
"""

from __future__ import annotations

from pathlib import Path

from models.qwen3_template import CHAT_TEMPLATE  # the real Qwen3 template (thinking switch, system turn)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEXT_LAYERS = 28  # the pipeline reads hidden states 9, 18 and 27
TEXT_HIDDEN = 8
OUT_LAYERS = 3
MARKER = "klein-tiny.json"  # saved beside the weights so every tier can tell they are random


def build_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=core,
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_pipeline(seed: int = 0, distilled: bool = True):  # type: ignore[no-untyped-def]
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=16,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    transformer = Flux2Transformer2DModel(
        in_channels=4 * 4,  # latents are packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=OUT_LAYERS * TEXT_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )


def save_tiny_pipeline(path: Path, distilled: bool = True) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder at `path` (idempotent). `distilled=False`: the
    stand-in for the base model (classifier-free guidance)."""
    if (path / MARKER).exists():
        return path
    build_tiny_pipeline(distilled=distilled).save_pretrained(path)
    (path / MARKER).write_text('{"random_weights": true, "purpose": "tests and machines without weights"}\n')
    return path
