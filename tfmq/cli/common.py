"""What every console script shares: --verbose, logging, one-line errors, and the model options."""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from tfmq.errors import TfmqError
from tfmq.hostcpu import keep_freed_memory

EXIT_ERROR = 2  # a user error or a failed gate; argparse uses 2 for bad arguments too


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", "-v", action="store_true", help="show debug logging and full tracebacks")
    return ap


def add_model_options(ap: argparse.ArgumentParser) -> None:
    """--model and what a conditional model's samples are asked for."""
    ap.add_argument("--model", default="mnist-ddpm",
                    help="bundled name (mnist-ddpm, mnist-cond), diffusers pipeline or UNet folder, or hub id "
                         "(default: mnist-ddpm)")
    ap.add_argument("--prompts", type=Path, metavar="FILE",
                    help="text-to-image pipelines: one prompt a line, UTF-8 (default: the shipped set of 32)")
    ap.add_argument("--encoder-hidden-states", type=Path, metavar="FILE",
                    help="a bare UNet2DConditionModel folder: safetensors with encoder_hidden_states [P, L, D] "
                         "and, for guidance, negative_encoder_hidden_states [1 or P, L, D]")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: 7.5 for prompts and encoder states, 1 for labels)")


def add_compute_options(ap: argparse.ArgumentParser) -> None:
    """Where the FP model runs while the calibration set is recorded (tfmq.compute)."""
    ap.add_argument("--torch-device", default="cpu", metavar="DEVICE",
                    help="cpu, cuda, cuda:N or mps: where the FP model records the calibration set (default cpu)")
    ap.add_argument("--torch-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="the FP model's dtype while recording (default float32)")


def compute_from(args: argparse.Namespace):
    from tfmq.compute import Compute

    return Compute(device=args.torch_device, dtype=args.torch_dtype)


def model_from(args: argparse.Namespace):
    """The model of --model with its conditioning, refused in one line where it cannot be used."""
    from tfmq.models import ConditioningSource, load_model

    if args.guidance is not None and not math.isfinite(args.guidance):
        raise TfmqError(f"--guidance {args.guidance}: must be a finite number")
    return load_model(args.model, ConditioningSource(prompts=args.prompts, encoder_states=args.encoder_hidden_states,
                                                     guidance=args.guidance))


def run(prog: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``body``; a TfmqError becomes one line on stderr and exit 2 (traceback with --verbose)."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    keep_freed_memory()
    signal.signal(signal.SIGTERM, _terminated)  # like Ctrl-C: the temporary output is removed
    try:
        return body(args)
    except TfmqError as e:
        if args.verbose:
            logging.exception("%s failed", prog)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130


def _terminated(signum, frame):
    raise KeyboardInterrupt
