"""Errors a user can act on; each message names the file, object or feature at fault."""


class CP2ImageError(Exception):
    """Base class: something the user can fix (input data, model file, settings)."""


class ModelFileError(CP2ImageError):
    """The model file is missing, unreadable, unsafe or not a cp2image model."""


class SpecError(ModelFileError):
    """The model spec inside a model file is incomplete or inconsistent."""


class DataError(CP2ImageError):
    """CellProfiler exports (CSVs, images) cannot be used as given."""
