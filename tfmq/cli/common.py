"""What every console script shares: --verbose, logging, and one-line errors."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable

from tfmq.errors import TfmqError
from tfmq.hostcpu import keep_freed_memory

EXIT_ERROR = 2  # a user error or a failed gate; argparse uses 2 for bad arguments too


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", "-v", action="store_true", help="show debug logging and full tracebacks")
    return ap


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
