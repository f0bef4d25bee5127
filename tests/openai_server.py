"""A small OpenAI-compatible chat server for the `openai` enhancer backend's tests: FastAPI serving a Qwen3 causal
LM (the tiny pipeline's text encoder, or any transformers folder) through transformers' `generate`, as vLLM or
llama.cpp's server would answer `POST /v1/chat/completions`: the model's chat template (with the request's
`chat_template_kwargs`), greedy at temperature 0, `max_tokens` bounded, `usage` counted.

    KLEIN_TEST_LM=<folder with text_encoder/ and tokenizer/> uvicorn tests.openai_server:app --port N
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from transformers import AutoTokenizer, GenerationConfig, Qwen3ForCausalLM

FOLDER = Path(os.environ["KLEIN_TEST_LM"])
MODEL_NAME = "tiny-qwen3"
tokenizer = AutoTokenizer.from_pretrained(FOLDER / "tokenizer")
model = Qwen3ForCausalLM.from_pretrained(FOLDER / "text_encoder").eval()
app = FastAPI()
requests: list[dict[str, Any]] = []  # what was asked, for GET /requests


@app.post("/v1/chat/completions")
async def chat(request: Request) -> JSONResponse:
    body = await request.json()
    requests.append({"body": body, "authorization": request.headers.get("authorization")})
    text = tokenizer.apply_chat_template(
        body["messages"], tokenize=False, add_generation_prompt=True, **(body.get("chat_template_kwargs") or {})
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    config = GenerationConfig(
        max_new_tokens=int(body.get("max_tokens") or 16),
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=config)
    new = output[0, inputs["input_ids"].shape[1] :]
    content = tokenizer.decode(new, skip_special_tokens=True)
    prompt_tokens, completion_tokens = int(inputs["input_ids"].shape[1]), int(new.shape[0])
    return JSONResponse(
        {
            "id": f"chatcmpl-{len(requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


@app.get("/requests")
async def asked() -> list[dict[str, Any]]:
    return requests


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
