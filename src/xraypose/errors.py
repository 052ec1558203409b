"""Exception types raised by xraypose.

Every error a user can trigger with bad input derives from :class:`XrayposeError`, so callers
(and the CLI) can catch one type and print one clear line.
"""

from __future__ import annotations


class XrayposeError(Exception):
    """Base class of all errors that xraypose raises on purpose."""


class InputError(XrayposeError, ValueError):
    """A user-supplied value (tensor, parameter, geometry) is invalid."""


class FileFormatError(XrayposeError, ValueError):
    """A file is missing, unreadable, corrupt, or in an unsupported format."""


class GeometryError(XrayposeError, ValueError):
    """A camera or pose configuration is physically impossible for the requested operation."""
