"""`forensics` sub-commands that live in their own module: each has configure_parser(parser) and
run(args) -> int, and is listed in assistant.cli.COMMANDS."""
