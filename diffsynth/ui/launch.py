"""`diffsynth ui`: load the models the command line names (flux-nano without any), start the page."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

LOCAL, EVERYWHERE = "127.0.0.1", "0.0.0.0"
# small images (flux-nano draws 64 px) fill the Result box, their pixels kept sharp
CSS = "#result img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def add_ui_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    p.add_argument("--listen", action="store_true",
                   help=f"serve on every network interface ({EVERYWHERE}) instead of {LOCAL} only: anyone who can "
                        "reach this machine can use the UI (it has no login)")
    p.add_argument("--output", default="ui_output",
                   help="the folder the UI writes (images, uploaded LoRAs, datasets, training runs)")
    p.add_argument("--folder", action="append", default=[], metavar="DIR",
                   help="a folder the UI may read (training images, LoRA files); repeatable")
    p.add_argument("--steps", type=int, dest="num_inference_steps",
                   help="default denoising steps on the page (default: 20 on flux-nano, else 30)")


def serves_nano(args) -> bool:
    from ..nano import SHIPPED
    return not args.model and Path(args.model_dir).resolve() == SHIPPED.resolve()


def load_state(args):
    """Everything the page needs: the pipeline (built as `generate` builds it), the folders, the defaults."""
    from ..generation import apply_folder_defaults, build_pipeline, compute_target, model_paths
    from ..ops.devices import check_device
    from ..nano import SHIPPED
    from . import conditions
    from .files import Sandbox
    from .jobs import Generator, grammar_check
    if not args.model and not args.model_dir:
        args.model_dir = str(SHIPPED)
    nano = serves_nano(args)
    for folder in args.folder:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--folder {folder}: no such folder")
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    check_device(compute_target(args)[0], "--device")
    args.height = args.width = None
    apply_folder_defaults(args)
    sandbox = Sandbox(Path(args.output), [Path(f) for f in args.folder])
    models = model_paths(args)
    pipe = build_pipeline(args, models)
    check = None
    if nano:
        from ..nano.shapes import vocabulary
        check = grammar_check(vocabulary())
    from .app import AppState
    return AppState(generator=Generator(pipe, models, sandbox, check), sandbox=sandbox, models=models,
                    kinds=conditions.available(pipe), nano=nano, height=args.height or 1024,
                    width=args.width or 1024, steps=args.num_inference_steps or (20 if nano else 30))


def serve(args) -> None:
    """Start the page and block until interrupted."""
    output = Path(args.output).resolve()
    # Gradio keeps uploads and served copies in its temp folder: keep it inside the output folder. Set before
    # gradio is imported (it reads the variable once).
    os.environ["GRADIO_TEMP_DIR"] = str(output / ".gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    state = load_state(args)
    from .app import build_app
    host = EVERYWHERE if args.listen else LOCAL
    if args.listen:
        print(f"warning: --listen serves the UI on every network interface ({EVERYWHERE}:{args.port}); anyone who "
              "can reach this machine can generate and train with it (there is no login)", file=sys.stderr)
    app = build_app(state)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(server_name=host, server_port=args.port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                   allowed_paths=[str(output)], show_error=False, css=CSS)
    except OSError as e:  # the port is taken
        raise RuntimeError(f"--port {args.port}: cannot serve on {host}:{args.port} ({e})") from None
    print(f"diffsynth ui: http://{LOCAL if not args.listen else host}:{args.port}/ (Ctrl+C to stop)", flush=True)
    # SIGTERM ends the process like Ctrl+C does, so a running training subprocess is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app.block_thread()
    finally:
        if state.training is not None:
            state.training.stop()
