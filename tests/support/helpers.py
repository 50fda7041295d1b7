"""Helpers the tests share (fixtures live in conftest.py)."""
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# tfmq-export flags for a quick quantized export: no reconstruction, 4 calibration
# trajectories, 8 reference images, a 6-step schedule
FAST = ("--iters", "0", "--calib-seeds", "4", "--n", "8", "--steps", "6")


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


def summary_row(stdout: str, target: str) -> str:
    """The line of the summary table that tfmq-export / tfmq-parity print for ``target``."""
    rows = [ln for ln in stdout.splitlines() if ln.split(" ", 1)[0] == target]
    assert rows, stdout
    return rows[-1]

# the convs at the full 32x32 resolution of mnist-ddpm: the inputs channel groups apply to
FULL_RES_DDPM = ["down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2", "up_blocks.1.upsamplers.0.conv",
                 "up_blocks.2.resnets.0.conv1", "up_blocks.2.resnets.0.conv2", "up_blocks.2.resnets.1.conv1",
                 "up_blocks.2.resnets.1.conv2"]
