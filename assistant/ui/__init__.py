"""The Gradio chat app (app.py, `forensics serve`): app.py builds the Blocks, session.py keeps each
person's conversation apart over a shared model, render.py draws the verdict, masks and evidence,
examples.py writes the built-in example images."""

from assistant.ui.app import build_app, launch
from assistant.ui.session import Session, SharedModels

__all__ = ["Session", "SharedModels", "build_app", "launch"]
