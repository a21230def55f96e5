"""`ldm serve`: AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, progress, interrupt,
options, sd-models, samplers, png-info) and a web page at /, over one model loaded once.
Requests wait their turn in a FIFO queue; SIGTERM (or Ctrl-C) stops taking connections and
finishes the jobs already accepted before exiting (a second Ctrl-C exits at once)."""
from __future__ import annotations

import argparse

NAME = "serve"
HELP = "serve the AUTOMATIC1111 HTTP API and a web page"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import RUN_DTYPES
    parser.add_argument("--model", help="the checkpoint to serve first (default: the model shipped in weights/)")
    parser.add_argument("--models-dir", metavar="DIR",
                        help="more checkpoints to offer (.safetensors, diffusers folders); switch with "
                             "POST /sdapi/v1/options {\"sd_model_checkpoint\": NAME}")
    parser.add_argument("--lora-dir", metavar="DIR", help="where prompts' <lora:NAME:w> tags find NAME.safetensors")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    parser.add_argument("--api-auth", metavar="USER:PASS", help="HTTP basic auth, as A1111 (user1:pw1,user2:pw2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=RUN_DTYPES)
    parser.add_argument("--graceful-timeout", type=float, metavar="S",
                        help="on SIGTERM, wait at most S seconds for accepted jobs (default: until done)")


def run(args) -> int:
    import signal
    import sys

    import uvicorn

    from .app import create_app
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    app = create_app(args.model, args.models_dir, args.lora_dir, args.device, args.dtype, args.api_auth)
    # uvicorn drains on SIGTERM, then re-raises it against the handler it found: exit 0 after a
    # clean drain rather than die by the signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=args.graceful_timeout,
                log_level="info")
    return 0
