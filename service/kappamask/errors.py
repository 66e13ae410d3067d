"""The project's exceptions, each carrying its HTTP status and OGC exception code.

This is the one place where a failure is mapped to what a client sees: the pygeoapi
processor reads ``http_status`` / ``ogc_code``, the CLI exits with ``exit_code`` (README
"Errors": 2 the input, 3 refused, 4 not found, 5 unusable product, 6 no model, 7 Triton
unavailable, 8 storage, 9 cancelled, 10 internal error, 11 the labelling tool). A message
never names a server path the client did not give.
"""

from __future__ import annotations

from http import HTTPStatus


class KappaMaskError(Exception):
    """Base class: a failure with a message a user can act on."""

    http_status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    ogc_code: str = "NoApplicableCode"
    exit_code: int = 1


class InvalidInputError(KappaMaskError):
    """A request parameter is malformed, unknown or out of range."""

    http_status = HTTPStatus.BAD_REQUEST
    ogc_code = "InvalidParameterValue"
    exit_code = 2


class AccessDeniedError(KappaMaskError):
    """The input or output location is outside what this server may touch."""

    http_status = HTTPStatus.FORBIDDEN
    ogc_code = "InvalidParameterValue"
    exit_code = 3


class ProductNotFoundError(KappaMaskError):
    """The product path, key or URL does not exist."""

    http_status = HTTPStatus.NOT_FOUND
    ogc_code = "InvalidParameterValue"
    exit_code = 4


class ProductError(KappaMaskError):
    """The product exists but cannot be used: not Sentinel-2, a band missing, corrupt file."""

    http_status = HTTPStatus.UNPROCESSABLE_ENTITY
    ogc_code = "InvalidParameterValue"
    exit_code = 5


class NoModelError(KappaMaskError):
    """No model is served for the product's processing level."""

    http_status = HTTPStatus.UNPROCESSABLE_ENTITY
    ogc_code = "NoApplicableCode"
    exit_code = 6


class InferenceUnavailableError(KappaMaskError):
    """Triton cannot be reached or is not ready."""

    http_status = HTTPStatus.SERVICE_UNAVAILABLE
    ogc_code = "NoApplicableCode"
    exit_code = 7


class CancelledError(KappaMaskError):
    """The job was cancelled by its owner."""

    http_status = HTTPStatus.CONFLICT
    ogc_code = "NoApplicableCode"
    exit_code = 9


class InternalError(KappaMaskError):
    """A failure of this service's own code: a bug, not the client's fault."""

    http_status = HTTPStatus.INTERNAL_SERVER_ERROR
    ogc_code = "NoApplicableCode"
    exit_code = 10


class ConfigurationError(InternalError):
    """A setting of the server (an environment variable) that does not parse: the
    operator's to fix, not the client's."""


class StorageError(KappaMaskError):
    """Object storage or a remote server failed or could not be reached."""

    http_status = HTTPStatus.BAD_GATEWAY
    ogc_code = "NoApplicableCode"
    exit_code = 8


class OutputStorageError(KappaMaskError):
    """The service's own output storage cannot be written (read-only, refused): the
    server's fault, never the client's."""

    http_status = HTTPStatus.SERVICE_UNAVAILABLE
    ogc_code = "NoApplicableCode"
    exit_code = 8


class StorageFullError(OutputStorageError):
    """The output storage has no room left for the result."""

    http_status = HTTPStatus.INSUFFICIENT_STORAGE


class LabellingToolError(KappaMaskError):
    """The labelling tool (a Label Studio server) cannot be reached, refuses the token or
    answers a request with an error: a failure of that server, not of the input."""

    http_status = HTTPStatus.BAD_GATEWAY
    ogc_code = "NoApplicableCode"
    exit_code = 11
