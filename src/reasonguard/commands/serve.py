"""`reasonguard serve`: an HTTP guard server (OpenAI-compatible /v1/moderations, /v1/classify).

Binds 127.0.0.1 unless told otherwise. Serving on another interface without an API key is
refused unless `--allow-no-key` says it is intended (a guard open to the network is a free GPU
for anyone and a leak of whatever is sent to it). A named `--api-key-env` variable that is unset
or empty is an error, never a silent "no auth".

Example:
    RG_KEY=s3cret reasonguard serve --model runs/sft/final --api-key-env RG_KEY \\
        --max-batch-size 16 --max-wait-ms 20
    reasonguard serve --model runs/sft/final --classifier runs/classifier/final
    curl -s localhost:8000/v1/moderations -H 'Authorization: Bearer s3cret' \\
        -H 'Content-Type: application/json' -d '{"input": "How do I pick a lock?"}'
"""

from __future__ import annotations

import argparse
from typing import Any

from reasonguard.commands.generate import (
    add_classifier_argument,
    add_model_arguments,
    backend_options,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a guard over HTTP (OpenAI-compatible /v1/moderations, /v1/classify)",
        description="Run an HTTP server in front of a guard model. Concurrent requests are "
        "batched together: with --backend hf by a dynamic batcher (--max-batch-size, "
        "--max-wait-ms); with --backend vllm by vLLM's async engine, where each item joins the "
        "running batch as it arrives (continuous batching). Endpoints: POST /v1/moderations, POST /v1/classify, GET /v1/models, "
        "WebSocket /v1/stream (streaming moderation of a growing response, hf), "
        "GET /health (with batching counters and open streams), GET /openapi.json (the OpenAPI "
        "schema), GET /docs (a plain page linking it; no Swagger UI, which needs a CDN).",
    )
    add_model_arguments(p)
    add_classifier_argument(p)
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=8000, help="default 8000")
    net.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require 'Authorization: Bearer <key>' on /v1/*, the key read from env var VAR",
    )
    net.add_argument(
        "--allow-no-key",
        action="store_true",
        help="allow binding a non-loopback host without an API key",
    )
    net.add_argument(
        "--served-model-name", metavar="NAME", help="model id in responses (default: --model)"
    )
    net.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    lim = p.add_argument_group("batching and limits")
    lim.add_argument(
        "--max-batch-size", type=int, default=8, help="hf: items per batch (default 8)"
    )
    lim.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="hf: wait for a fuller batch (default 10)"
    )
    lim.add_argument("--max-items", type=int, default=64, help="items per request (default 64)")
    lim.add_argument(
        "--max-chars", type=int, default=100_000, help="characters per request (default 100000)"
    )
    lim.add_argument(
        "--timeout-s", type=float, default=120.0, help="per-request time limit, 504 (default 120)"
    )
    lim.add_argument("--max-queue", type=int, default=1024, help="queued items, 503 (default 1024)")
    lim.add_argument(
        "--max-streams",
        type=int,
        default=16,
        help="WebSocket streams open at once, each holding one response's KV cache (default 16)",
    )
    p.add_argument("--no-scores", action="store_true", help="skip the label probabilities")
    p.add_argument(
        "--reasoning",
        choices=("auto", "always", "never"),
        default="auto",
        help="default of a request's `reasoning` field: auto (default) = fast verdicts with "
        "reasoning inside the model's calibrated uncertainty band (`reasonguard calibrate`), "
        "always when none is calibrated; with --classifier, the three-tier cascade; always = "
        "reason before every verdict; never = fast verdicts only",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    from reasonguard.errors import UserError

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that variable is unset or empty")
    if api_key is None and not is_loopback(args.host) and not args.allow_no_key:
        raise UserError(
            f"--host {args.host} exposes the server beyond this machine without an API key; "
            "give --api-key-env VAR, or --allow-no-key if that is really intended"
        )
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    check_port(args.host, args.port)  # before the model loads: a busy port costs nothing
    _check_classifier(args)

    import uvicorn

    from reasonguard.infer.guard import load_guard
    from reasonguard.serve.app import ServeSettings, create_app

    try:
        settings = ServeSettings(
            model_name=args.served_model_name or args.model,
            api_key=api_key,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_items=args.max_items,
            max_chars=args.max_chars,
            timeout_s=args.timeout_s,
            max_queue=args.max_queue,
            scores=not args.no_scores,
            reasoning=args.reasoning,
            max_streams=args.max_streams,
        )
    except ValueError as exc:
        raise UserError(str(exc).replace("_", "-")) from None
    if api_key is None and not is_loopback(args.host):
        logging.getLogger(__name__).warning(
            "serving on %s WITHOUT an API key (--allow-no-key)", args.host
        )
    options = backend_options(args)
    guard: Any
    if args.backend == "vllm":
        from reasonguard.serve.engine import AsyncGuard

        # vLLM's async engine: each item joins the running batch as it arrives.
        guard = AsyncGuard.load(
            args.model,
            args.prompt_format,
            max_new_tokens=args.max_new_tokens,
            max_queue=args.max_queue,
            **options,
        )
    else:
        # One dynamic batch is one generate call: the backend must not cut it again.
        options["batch_size"] = args.batch_size or args.max_batch_size
        guard = load_guard(
            args.model,
            backend=args.backend,
            prompt_format=args.prompt_format,
            max_new_tokens=args.max_new_tokens,
            classifier=args.classifier,
            **options,
        )
    app = create_app(guard, settings)
    # WebSocket frames up to twice our own limit reach the app, which answers an oversized
    # one with an error frame; only larger ones are cut off by the protocol (close 1009).
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ws_max_size=2 * settings.max_body_bytes,
    )
    return 0


def _check_classifier(args: argparse.Namespace) -> None:
    """A classifier folder (`reasonguard train classifier`) is served by transformers, and it
    has no reasoning to be asked for: refused here, before anything loads."""
    from reasonguard.classifier.kinds import is_classifier
    from reasonguard.errors import UserError
    from reasonguard.models import resolve_model

    if args.classifier is not None:
        from reasonguard.commands.generate import classifier_tier

        if args.backend != "hf":
            raise UserError(
                "--classifier: the three-tier cascade is served with --backend hf (the vllm "
                "server runs the guard's own modes)"
            )
        args.mode = "cascade"
        classifier_tier(args)  # a bad folder or a missing calibration fails here
    if not is_classifier(resolve_model(args.model)):
        return
    if args.backend != "hf":
        raise UserError(f"{args.model} is an encoder classifier: serve it with --backend hf")
    if args.reasoning == "always":
        raise UserError(
            f"--reasoning always: {args.model} is an encoder classifier, it writes no reasoning"
        )


def check_port(host: str, port: int) -> None:
    """Bind `host:port` as uvicorn will (SO_REUSEADDR, IPv6 for a host with a colon) and let it
    go again, so a port another server holds is refused before anything loads.

    Raises:
        UserError: the address cannot be bound (in use, not an address of this machine, or a
            privileged port), naming host:port and the system's reason.
    """
    import errno
    import socket

    from reasonguard.errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            hint = (
                "another server (a second `reasonguard serve`?) is listening there; stop it, "
                "or choose another --port"
                if exc.errno == errno.EADDRINUSE
                else "check --host and --port"
            )
            raise UserError(f"cannot listen on {address}: {reason}; {hint}") from None


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: cannot tell, so treat as exposed
