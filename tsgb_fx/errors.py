"""Errors raised by tsgb-fx itself (bad arguments raise ValueError or TypeError)."""


class TSGBError(RuntimeError):
    """Base class of tsgb-fx's own errors."""


class TraceError(TSGBError):
    """The model could not be traced; the message names what failed and what to try."""
