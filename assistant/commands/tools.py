"""`forensics tools [--format openai|mcp|langchain] [--experts a,b]`: print the tool schemas as JSON.

openai: the assistant's tools in OpenAI function-calling form, generated from the expert registry (what
the embedded model sees, and what any function-calling model can be given). mcp: the tools that
`forensics mcp` serves (name, description, inputSchema). langchain: the LangChain tools of
assistant.integrations.langchain_tools (name, description, args schema).
"""

from __future__ import annotations

import argparse
import json


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--format", choices=("openai", "mcp", "langchain"), default="openai")
    parser.add_argument("--experts", help="comma-separated experts (default: all)")


def run(args: argparse.Namespace) -> int:
    experts = [n.strip() for n in (args.experts or "").split(",") if n.strip()] or None
    if args.format == "openai":
        from assistant.tools import tool_schemas

        listing = tool_schemas(experts)
    elif args.format == "mcp":
        from assistant.integrations.mcp_server import mcp_tool_listing

        listing = mcp_tool_listing(experts)
    else:
        from assistant.integrations.langchain_tools import langchain_tool_listing

        listing = langchain_tool_listing(experts)
    print(json.dumps(listing, indent=2, ensure_ascii=False))
    return 0
