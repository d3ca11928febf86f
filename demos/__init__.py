"""The Gradio side-by-side demo (installed as ``vtr.demos``): ``vtr demo`` serves :mod:`vtr.demos.side_by_side`.

Only :mod:`vtr.demos.side_by_side` imports Gradio (the ``demo`` extra); the geometry, overlay, figure and
engine modules are plain Python and are unit-tested without a browser.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options (``vtr demo`` and ``python -m vtr.demos.side_by_side``)."""
    parser.add_argument("--model", default=None, help="Hugging Face id or local path (default: bundled tiny model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs internet)")
    parser.add_argument("--dtype", default="float32", help="torch dtype to load the model in")
    parser.add_argument("--device", default="cpu")
