"""Typed errors. The CLI prints ``str(error)`` as one line and exits non-zero."""


class TfmqError(Exception):
    """Base of every error the tool reports to a user."""


class ModelLoadError(TfmqError):
    """A model path, folder layout, config or weights file that cannot be loaded."""


class UnsupportedModel(ModelLoadError):
    """A model class the tool does not quantize."""


class MissingDependency(TfmqError):
    """An optional package is needed; the message carries the install hint."""


class RecipeError(TfmqError):
    """A recipe that is unknown, malformed, or impossible for the chosen target."""


class ExportError(TfmqError):
    """Lowering or compiling an artifact failed."""


class ParityError(TfmqError):
    """A parity gate failed."""


class TargetUnavailable(TfmqError):
    """The runtime a target needs is not installed here."""


def first_line(e: BaseException, empty: str | None = None) -> str:
    """The first line of a library's error message, for a one-line error of ours; ``empty``
    (default: the exception's type name) where the message is blank."""
    text = str(e).strip()
    return text.splitlines()[0] if text else (empty or type(e).__name__)
