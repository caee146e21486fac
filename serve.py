#!/usr/bin/env python3
"""Serve an artist model over HTTP: a JSON API (classify, style features, similar works) and a page to try it.

Loads the model (and a gallery) once; requests arriving together are batched into one model call. Example::

    python serve.py --checkpoint runs/artist            # then open http://127.0.0.1:8000/ (API docs at /docs)
    python serve.py --checkpoint runs/artist --gallery gallery   # adds similar works and gallery management
    kill -HUP <pid>                                     # reload the model folder and gallery without downtime

The API, its limits, metrics and running it behind a reverse proxy are described in docs/service.md.
"""

import argparse
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from errors import import_optional
from predictor import add_runtime_args, engine_options
from utils import run_cli

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

API_KEY_ENV = "ARTIST_API_KEY"  # read when --api-key is not given


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="model folder (model_best.pth + class_mapping.csv + config.json) or checkpoint file")
    parser.add_argument("--gallery", default=None,
                        help="a gallery of this model (tools/build_gallery.py: a folder, or a Milvus location FILE.db "
                             "or http://host:19530, optionally #COLLECTION): POST /v1/similar answers from it, the "
                             "page shows similar works, and artists can be enrolled and removed (uploaded references "
                             "are kept in GALLERY.references/; not for a Milvus server)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--max-batch", type=int, default=32, help="most images in one model call (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long a batch waits for more images after its first (default: 10); a model of "
                             "several lanes (onnxruntime on a CPU) does not wait: its batches share the waiting images")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default: 20)")
    parser.add_argument("--max-files", type=int, default=16, help="most images in one request (default: 16)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="most pixels (width x height) of one image (default: Pillow's decompression-bomb "
                             "limit, about 89 million)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="most inference requests in progress at once; more are answered 429 (default: 64)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: the {API_KEY_ENV} "
                             "environment variable; unset: no key)")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="allow a web page from this origin (e.g. https://example.org) to call the API; repeat "
                             "for more (default: none)")
    parser.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                        help="serve Prometheus metrics at GET /metrics, behind the API key when there is one "
                             "(default: on)")
    parser.add_argument("--root-path", default="",
                        help="the sub-path a reverse proxy serves this under, e.g. /artist (default: none)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return add_runtime_args(parser)


def prepare(args: argparse.Namespace) -> tuple["uvicorn.Server", socket.socket]:
    """The server for ``args`` and its listening socket (the model is loaded); ``main`` runs it."""
    needs = "requirements-serve.txt -r requirements-retrieval.txt"
    service = import_optional("service", needs, "serve.py")
    server = import_optional("service.server", needs, "serve.py")
    overrides = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
    settings = service.Settings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
        max_files=args.max_files, max_queue=args.max_queue, decode_threads=max(1, args.num_workers),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, cors_origins=tuple(args.cors_origin),
        host=args.host, metrics=args.metrics, **overrides)
    source = service.Source(args.checkpoint, args.gallery, args.device, args.amp, args.compile,
                            engine_options(args))
    sock = server.bind(args.host, args.port)  # before loading the model: a busy port fails at once
    try:
        model, gallery, _ = source.load()
    except BaseException:
        sock.close()
        raise
    if settings.api_key is None and not settings.local_only:
        print(f"warning: listening on {args.host} without an API key: anyone who reaches it can use the model (gallery "
              f"changes and reloads are refused); pass --api-key or set {API_KEY_ENV}", file=sys.stderr)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    with_gallery = f", gallery of {len(gallery.artist_names)} artists" if gallery is not None else ""
    print(f"serving {model.model_name} ({len(model.class_names or [])} classes{with_gallery}) on "
          f"http://{host}:{port}/ (API docs: /docs)", flush=True)
    app = service.create_app(model, settings, gallery, source)
    return server.build_server(app, args.log_level, args.root_path), sock


def reload_on_sighup(app: "FastAPI") -> None:
    """From now on SIGHUP reloads ``app``'s model folder and gallery, as POST /v1/admin/reload does (call it from
    the main thread)."""
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, lambda signum, frame: app.state.service.reload_soon())


def main(args: argparse.Namespace | None = None) -> None:
    server, sock = prepare(args if args is not None else get_args_parser().parse_args())
    reload_on_sighup(server.config.app)
    server.run(sockets=[sock])


if __name__ == "__main__":
    run_cli(main)
