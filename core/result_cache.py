"""The result cache (docs/cache.md): what makes two requests' outputs the same, and the statements that find an
earlier prediction's outputs and expire the answers given from them. Torch-free: the API and the workers use it.

A request is cacheable when its output is fully determined: an explicit seed, the same model served from the same
weights (`weights_identity`, which each worker publishes when it starts, `weights_key`), the same generation
parameters after normalization, its reference images and LoRAs by content hash, the same output format and
quality, the same safety policy and image checker. `cache_key` hashes exactly that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy import Select, Update, func, or_, select, text, update

from core.tables import CACHED, tenants
from core.tables import predictions as p

WORKER = "result-cache"  # the worker_id of a prediction answered from the cache: no GPU worker ran it
SMALL_FILE = 4 * 2**20  # weights-folder files up to this size are hashed by content (configs, tokenizer)
KEY_VERSION = 1  # bump when what the key covers changes: older keys then never match


def weights_key(queue_name: str, model_id: str) -> str:
    """Where a model's workers publish the identity of the weights they serve (empty: unknown)."""
    return f"{queue_name}:weights:{model_id}"


def weights_identity(model_path: str, dtype: str, fp8: bool) -> str:
    """The served weights' identity: every configuration file of the folder (or of the hub snapshot) by content,
    every weight file by its path, size and modification time (in the Hugging Face cache, the blob's name is its
    content hash and is taken too), and the dtype and float8 switch the worker runs them with. Hashing the
    weights' bytes would cost a start minutes on the real 8 GB; a file replaced in place changes its time."""
    folder = Path(model_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download  # worker only; the pipeline loaded it from there already

        folder = Path(snapshot_download(model_path, local_files_only=True))
    digest = hashlib.sha256(f"v{KEY_VERSION} dtype={dtype} fp8={fp8}\n".encode())
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    for path in files:
        relative, size = path.relative_to(folder).as_posix(), path.stat().st_size
        if size <= SMALL_FILE:
            digest.update(f"{relative}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
        else:
            stat = path.resolve().stat()
            digest.update(f"{relative}\0{path.resolve().name}\0{size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def cache_key(
    model: str,
    distilled: bool,
    weights: str,
    checker: str,
    params: dict[str, Any],
    reference_sha256s: list[str],
) -> str:
    """sha256 of what determines a prediction's outputs. `params` is GenerationParams as JSON, its LoRAs resolved
    (their content hashes and scales) and without its reference keys (per prediction: the references count by
    `reference_sha256s`, in order); `checker` is the image checker its model's workers run (core/safety.py).
    Normalized: guidance is left out for a distilled model (which ignores it), the quality for PNG (lossless)."""
    determined = {
        "v": KEY_VERSION,
        "model": model,
        "weights": weights,
        "checker": checker,
        "prompt": params["prompt"],
        "size": [params["width"], params["height"]],
        "steps": params["num_inference_steps"],
        "guidance": None if distilled else params["guidance_scale"],
        "seed": params["seed"],
        "format": params["output_format"],
        "quality": None if params["output_format"] == "png" else params["output_quality"],
        "outputs": params["num_outputs"],
        "max_sequence_length": params["max_sequence_length"],
        "references": reference_sha256s,
        "loras": [[lora["sha256"], lora["scale"]] for lora in params.get("loras", ())],
        "safety": params["safety"],
    }
    return hashlib.sha256(json.dumps(determined, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def original(tenant_id: str, key: str, default_retention_s: int) -> Select[Any]:
    """The tenant's latest generated prediction with this key whose outputs are stored and within their retention
    (a cached answer is never served past its original's), if the operator did not opt the tenant out."""
    kept_s = func.coalesce(tenants.c.retention_s, default_retention_s)
    return (
        select(p.c.id, p.c.outputs, p.c.safety)
        .join(tenants, tenants.c.id == p.c.tenant_id)
        .where(
            p.c.tenant_id == tenant_id,
            p.c.cache_key == key,
            text(CACHED),  # the partial index's own predicate, as a literal: a bound status would not match it
            p.c.completed_at + func.make_interval(0, 0, 0, 0, 0, 0, kept_s) > func.now(),
            tenants.c.result_cache.is_not(False),
        )
        .order_by(p.c.completed_at.desc())
        .limit(1)
    )


def expire_with_originals(ids: list[str], tenant_id: str | None = None) -> Update:
    """Mark the predictions `ids` (of `tenant_id`, if given) and every answer the cache gave from them expired:
    those answers' outputs are the originals' objects, deleted now (core/retention.py, api/services/retention.py).
    Deleting a cached answer deletes nothing of its original's: its own prefix holds no object."""
    statement = update(p).where(or_(p.c.id.in_(ids), p.c.cached_from.in_(ids)))
    if tenant_id is not None:
        statement = statement.where(p.c.tenant_id == tenant_id)
    return statement.values(expired_at=func.coalesce(p.c.expired_at, func.now()))
