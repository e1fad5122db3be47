"""The Gradio app of editkit (``pip install 'editkit[app]'``; run ``editkit app`` or ``python app.py``).

:func:`build_demo` returns the page's ``gr.Blocks`` without loading a model; the model loads on the
first request and is shared by every tab. :func:`launch_demo` launches it with editkit's settings.
"""

from __future__ import annotations

from editkit.app.demo import MAX_FILE_SIZE, build_demo, launch_demo
from editkit.app.models import METHODS, ModelManager

__all__ = ["MAX_FILE_SIZE", "METHODS", "ModelManager", "build_demo", "launch_demo"]
