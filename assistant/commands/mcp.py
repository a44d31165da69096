"""`forensics mcp [--experts a,b]`: serve the experts and the assistant as MCP tools over stdio.

An MCP client (Claude Desktop, an IDE, mcp.client.stdio) starts this command and talks to it on stdin
and stdout; see docs/INTEGRATIONS.md for a client configuration. Tools: one per expert, analyze_image
and ask_forensics_assistant; images in as a file path or base64, masks out as PNG images.
"""

from __future__ import annotations

import argparse
import logging


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--experts", help="comma-separated experts to serve (default: all)")


def run(args: argparse.Namespace) -> int:
    from assistant.integrations.mcp_server import serve

    logging.getLogger().setLevel(logging.WARNING)  # stderr only: stdout carries the protocol
    experts = [n.strip() for n in (args.experts or "").split(",") if n.strip()] or None
    serve(experts)
    return 0
