"""``atari-vae serve``: latent means over HTTP, safe to expose.

The model is read as weights only (``config.json`` + ``model.safetensors`` or a ``.pt``
state_dict, ``weights_only=True``): no code from the artifact store runs, whatever it holds.
Requests are checked before any work: bodies over ``--max_request_mb`` and batches over
``--max_frames`` get 413; anything but finite ``(N, 3, 64, 64)`` values in [0, 1] gets 400.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from atari_vae.config import ServeConfig
from atari_vae.envs import FRAME_SHAPE
from atari_vae.model import VAE

log = logging.getLogger(__name__)
MIB = 1 << 20


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_frames(body: bytes, max_frames: int) -> np.ndarray:
    """``{"inputs": [...]}`` -> (N, 3, 64, 64) float32 in [0, 1], or a RequestError."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not JSON: {exc}") from exc
    inputs = doc.get("inputs", doc.get("instances")) if isinstance(doc, dict) else None
    if inputs is None:
        raise RequestError(400, 'expected a JSON object {"inputs": [frames...]}')
    if isinstance(inputs, list) and len(inputs) > max_frames:
        raise RequestError(413, f"{len(inputs)} frames in one request; at most {max_frames}")
    try:
        frames = np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise RequestError(400, f"inputs must be numbers in nested lists: {exc}") from exc
    if frames.ndim != 4 or frames.shape[1:] != FRAME_SHAPE or not len(frames):
        raise RequestError(400, f"inputs must have shape (N, {', '.join(map(str, FRAME_SHAPE))})"
                                f" with N >= 1, got {frames.shape}")
    if not np.isfinite(frames).all():
        raise RequestError(400, "inputs hold NaN or infinite values; frames are in [0, 1]")
    if frames.min() < 0 or frames.max() > 1:
        raise RequestError(400, f"inputs range over [{frames.min():g}, {frames.max():g}]; "
                                f"frames are in [0, 1] (atari_vae.preprocess)")
    return frames


def encode(model: VAE, frames: np.ndarray) -> list[list[float]]:
    """Posterior means ``(N, latent_dim)`` for preprocessed frames."""
    device = next(model.parameters()).device
    with torch.no_grad():
        mu, _ = model.encode(torch.from_numpy(frames).to(device))
    return mu.float().cpu().tolist()


async def read_body(receive: Any, limit: int, declared: int | None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    if declared is not None and declared > limit:
        raise RequestError(413, f"request body of {declared / MIB:.1f} MiB; at most "
                                f"{limit / MIB:.1f} MiB")
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # a chunked upload declares no length: stop at the limit
            raise RequestError(413, f"request body over {limit / MIB:.1f} MiB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def build_app(model: VAE, model_uri: str, max_frames: int, max_bytes: int) -> Any:
    """The Starlette app: GET /ping, GET /version, POST /invocations."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    info = {"model_uri": model_uri, "latent_dim": model.latent_dim,
            "input_shape": list(FRAME_SHAPE), "max_frames": max_frames,
            "max_request_bytes": max_bytes}

    async def ping(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def version(request: Request) -> JSONResponse:
        return JSONResponse(info)

    async def invocations(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        try:
            body = await read_body(request.receive, max_bytes,
                                   int(declared) if declared and declared.isdigit() else None)
            frames = await run_in_threadpool(parse_frames, body, max_frames)
        except RequestError as exc:
            # a refused body is not drained: close the connection rather than read it all
            return JSONResponse({"error": str(exc)}, status_code=exc.status,
                                headers={"Connection": "close"})
        return JSONResponse({"predictions": await run_in_threadpool(encode, model, frames)})

    return Starlette(routes=[Route("/ping", ping), Route("/health", ping),
                             Route("/version", version),
                             Route("/invocations", invocations, methods=["POST"])])


def serve_job(cfg: ServeConfig) -> None:
    """Load the model (weights only) and serve it until interrupted."""
    import uvicorn

    from atari_vae.registry import load_model
    from atari_vae.runtime import resolve_device

    cfg.validate()
    device = resolve_device(cfg.device)
    model = load_model(cfg.model_uri, device)
    max_bytes = int(cfg.max_request_mb * MIB)
    app = build_app(model, cfg.model_uri, cfg.max_frames, max_bytes)
    log.info("serving %s (latent_dim %d) on http://%s:%d/invocations; at most %d frames and "
             "%.0f MiB a request", cfg.model_uri, model.latent_dim, cfg.host, cfg.port,
             cfg.max_frames, cfg.max_request_mb)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
