"""`forensics serve [--port N] [--share] [--model PATH] [--experts a,b]`: the Gradio chat app.

Serves on 127.0.0.1 (this machine only) unless --host says otherwise; a public gradio.live link is made
only with --share. The language model loads on the first question and is shared by every session;
each browser session has its own conversation. The HTTP API is at /gradio_api (docs/INTEGRATIONS.md).
"""

from __future__ import annotations

import argparse
import os


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    parser.add_argument("--share", action="store_true", help="also make a public share link (network)")
    parser.add_argument("--model", help="a local transformers model folder (default: the embedded model)")
    parser.add_argument("--adapter", help="a LoRA adapter folder for --model")
    parser.add_argument("--experts", help="comma-separated experts that run (default: all)")
    parser.add_argument("--preload", action="store_true", help="load the language model before serving")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from assistant.backends import load_backend
    from assistant.ui import SharedModels, build_app, launch

    experts = [n.strip() for n in (args.experts or "").split(",") if n.strip()] or None
    models = SharedModels(
        lambda spec: load_backend(spec, adapter=args.adapter if spec == args.model else None)
    )
    if args.preload:
        models.get(args.model)
    demo = build_app(models, model=args.model, experts=experts)
    launch(demo, host=args.host, port=args.port or None, share=args.share)
    return 0
