"""`forensics` command line: analyze, chat, eval, serve, mcp, tools, experts, ... (`forensics -h`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from experts import available_experts, expert_class

# Sub-commands that live in their own module: each has configure_parser(parser) and run(args) -> int.
COMMANDS = {
    "analyze": ("assistant.commands.analyze", "analyse images and write reports (folders, JSONL, resume)"),
    "chat": ("assistant.commands.chat", "ask the assistant about an image (answers with a checked verdict)"),
    "eval": ("assistant.evaluate", "evaluate experts and fusion on a labelled data set"),
    "sign": ("assistant.commands.sign", "attach C2PA Content Credentials signed with your certificate"),
    "protect": ("assistant.commands.protect", "embed our invisible, tamper-localising watermark"),
    "verify": ("assistant.commands.verify", "check an image for our watermark and show changed regions"),
    "segment": ("assistant.commands.segment", "mask the region a box or points select (SAM or its student)"),
    "serve": ("assistant.commands.serve", "the chat app in the browser (Gradio, 127.0.0.1)"),
    "mcp": ("assistant.commands.mcp", "serve the experts and the assistant as MCP tools over stdio"),
    "tools": ("assistant.commands.tools", "print the tool schemas (OpenAI function calling, MCP, LangChain)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forensics", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = commands.add_parser(name, help=summary)
        module.configure_parser(command)
        command.set_defaults(handler=module.run)

    list_cmd = commands.add_parser("experts", help="list the registered experts")
    list_cmd.set_defaults(handler=cmd_experts)
    return parser


def cmd_experts(args: argparse.Namespace) -> int:
    for name in available_experts():
        print(f"{name:<12} {expert_class(name).description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
