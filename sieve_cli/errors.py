"""The domain errors: each is a problem the user can fix, printed by the CLI as one line."""


class SieveError(Exception):
    """Base of every error sieve raises on purpose. The message names the problem and the fix."""


class InputError(SieveError):
    """A path, option or file the user gave is wrong."""


class ModelLoadError(SieveError):
    """A model could not be loaded from the source given."""


class UnsupportedArchitectureError(SieveError):
    """The model's architecture is not in the table of supported families."""


class TaskError(SieveError):
    """A task file is malformed or its data cannot be read."""


class WorkspaceError(SieveError):
    """The workspace is missing a stage, or holds outputs made from other inputs."""


class MissingStageError(WorkspaceError):
    """An upstream stage has not been run in this workspace."""


class StaleStageError(WorkspaceError):
    """A stage's existing outputs were made from other inputs; --force replaces them."""


class WorkerError(SieveError):
    """The search's pool of workers cannot go on (a candidate keeps killing its worker)."""
