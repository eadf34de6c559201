"""One error hierarchy. Every message says what went wrong, where, and how to fix it.

The CLI prints ``error: <message>`` on one line and exits with ``exit_code``; nothing here
ever needs a traceback to be understood.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of all errors graphopt raises on purpose.

    ``exit_code`` 2 marks user errors (bad input, bad options, bad files); 1 marks a
    rewrite that broke its promise (a failed verification) or an internal fault.
    """

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        msg = self.what
        if self.where:
            msg = f"{self.where}: {msg}"
        if self.fix:
            msg = f"{msg} ({self.fix})"
        return msg


class ModelFileError(GraphoptError):
    """The model file could not be loaded or does not follow the convention."""


class CaptureError(GraphoptError):
    """torch.fx could not capture the model at all."""


class ConfigError(GraphoptError):
    """A user configuration error: bad options, flags or settings (exit 2). Catch this for any
    of the configuration errors below."""


class PassConfigError(ConfigError):
    """Unknown pass, unknown option, bad option value, bad pipeline file."""


class LaunchConfigError(ConfigError):
    """A pipeline/data-parallel launch that cannot run as configured (stages, replicas, world size,
    microbatches, schedule, rendezvous)."""


class OrtConfigError(ConfigError):
    """A setting ONNX Runtime training does not support (loss, optimizer, device)."""


class PreconditionError(GraphoptError):
    """A pass cannot run on this graph (its ``requires`` failed)."""


class VerificationError(GraphoptError):
    """A rewrite did not keep the promise its semantics make."""

    exit_code = 1


class EmitError(GraphoptError):
    """An artifact could not be written (folder exists, graph not emittable, ...)."""


class ArtifactError(GraphoptError):
    """An emitted folder is missing, corrupt, or does not match its manifest."""


class MissingDependencyError(GraphoptError):
    """An optional dependency is needed for this feature."""


class PassError(GraphoptError):
    """A pass crashed or produced a graph that does not run (a bug in the pass)."""

    exit_code = 1
