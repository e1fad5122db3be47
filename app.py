"""Launch editkit's Gradio demo: ``python app.py --model PATH_OR_HUB_ID [--host H] [--port P]``.

Hugging Face Spaces convention: importing this file builds ``demo`` without loading a model (the
model, ``$EDITKIT_MODEL`` or Stable Diffusion 1.5, loads on the first request); it launches only
when run as a script. The UI lives in ``editkit.app``; ``editkit app`` is the same launcher.
"""

from __future__ import annotations

from editkit.app import build_demo, launch_demo

demo = build_demo()

if __name__ == "__main__":
    from editkit.commands.app import build_launcher_parser

    args = build_launcher_parser().parse_args()
    if args.model is not None or args.device is not None or args.dtype is not None:
        demo = build_demo(args.model, device=args.device, dtype=args.dtype)
    launch_demo(demo, host=args.host, port=args.port, share=args.share)
