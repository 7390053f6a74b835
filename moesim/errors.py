"""The two errors moesim raises on purpose.

``ScenarioError`` is for bad input: it names the dotted field path (``parallelism.expert``) and
says what is wrong, so the CLI can print it on one line. ``SimulationError`` is for a model that
cannot proceed (a deadlock in a schedule, a memory estimate over budget).
"""

from __future__ import annotations


class MoesimError(Exception):
    """Base class of the errors moesim raises deliberately."""


class ScenarioError(MoesimError):
    """A scenario file or value is invalid.

    Parameters
    ----------
    path : str
        Dotted path of the offending field (``cluster.nodes``), or the file name when the whole
        file is at fault.
    message : str
        What is wrong, in words a user can act on.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)

    def __reduce__(self) -> tuple[type[ScenarioError], tuple[str, str]]:
        # Picklable, so an error raised in a worker process reaches the parent intact.
        return (type(self), (self.path, self.message))


class SimulationError(MoesimError):
    """The simulation cannot proceed with a valid scenario (for example a schedule deadlock)."""
