"""The Gradio chat app: `python app.py` (the same as `forensics serve`; `--help` lists the options).

Serves on http://127.0.0.1:7860 (this machine only); `--share` also makes a public link.
"""

from __future__ import annotations

import sys

from assistant.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
