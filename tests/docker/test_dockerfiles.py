"""Every Dockerfile passes hadolint (the images are linted here, not built: no Docker engine)."""
import shutil
import subprocess

import pytest

from helpers import REPO

DOCKERFILES = sorted((REPO / "docker").glob("*Dockerfile"))


def hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: pip install 'tfmq-dm[dev]'")
    return exe


def test_there_are_dockerfiles():
    assert DOCKERFILES


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    out = subprocess.run([hadolint(), "--failure-threshold", "info", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install tfmq-dm\n")
    out = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist(path):
    for line in path.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{path.name}: COPY {src} does not exist"
