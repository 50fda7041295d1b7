"""The target registry: a folder under targets/ with a TARGET is a target, and the CLI takes its
name, its description and its options from it; nothing else names it."""
import argparse
import sys
import textwrap
from dataclasses import fields

import pytest

from tfmq.targets import registry
from tfmq.targets.base import Target, TargetOptions


def test_the_bundled_targets_are_found_with_their_options():
    found = registry.targets()
    assert {"coreml", "onnx", "openvino", "tensorrt"} <= set(found)  # a new folder adds itself
    assert list(found) == sorted(found, key=lambda n: found[n].__module__)  # in the order of their folders
    for t in found.values():
        assert isinstance(t, Target) and t.description and issubclass(t.Options, TargetOptions)
        for f in fields(t.Options):
            assert f.metadata.get("help", "").startswith(f"{t.name}:"), (t.name, f.name)
    with pytest.raises(Exception, match="unknown target 'xpu'"):
        registry.get_target("xpu")


FIFTH = '''
from dataclasses import dataclass, field
from pathlib import Path

from tfmq.runner import Tolerance
from tfmq.targets.base import Target, TargetOptions


@dataclass(frozen=True)
class Options(TargetOptions):
    label = "Toy"
    lanes: int | None = field(default=None, metadata={"help": "toy: vector lanes"})


class Toy(Target):
    name = "toy"
    consumes = "qdq-onnx"
    description = "a target that exists only in this test"
    Options = Options
    tolerance = Tolerance(0.1, 1e-3, 0.05, 1.0)

    def compile(self, lowered, out_dir: Path, options) -> dict:
        return {}

    def runner(self, out_dir: Path, options=None):
        raise NotImplementedError


TARGET = Toy()
'''


@pytest.fixture
def fifth_target(tmp_path, monkeypatch):
    """A throwaway target folder beside the real ones (tfmq.targets' search path extended)."""
    import tfmq.targets as pkg

    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "__init__.py").write_text(textwrap.dedent(FIFTH))
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    registry.targets.cache_clear()
    yield
    registry.targets.cache_clear()
    sys.modules.pop("tfmq.targets.toy", None)


def test_a_new_folder_is_a_target_with_its_flags_and_nothing_else_changes(fifth_target):
    from tfmq.cli.export import description
    from tfmq.cli.options import add_target_options, target_options

    assert "toy" in registry.targets() and registry.get_target("toy").name == "toy"
    assert "toy        a target that exists only in this test" in description()
    ap = argparse.ArgumentParser()
    add_target_options(ap)
    args = ap.parse_args(["--lanes", "8"])
    assert target_options(args, "toy") == {"toy": {"lanes": 8}}
    assert target_options(args, "all")["toy"] == {"lanes": 8}
    with pytest.raises(Exception, match="--lanes is an option of the toy target, not of 'onnx'"):
        target_options(args, "onnx")
