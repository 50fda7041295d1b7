import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ddpm():
    from tfmq.models import load_model

    return load_model("mnist-ddpm")


@pytest.fixture(scope="session")
def cond():
    from tfmq.models import load_model

    return load_model("mnist-cond")


def cli(*args, cwd=None):
    """Run a console script as a user would; returns the CompletedProcess."""
    exe = shutil.which(args[0]) or args[0]
    return subprocess.run([exe, *map(str, args[1:])], capture_output=True, text=True, cwd=cwd, timeout=600)


def one_line_error(proc, prog):
    """A user error: non-zero exit, exactly one line on stderr naming the program, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]
