"""The SmartMail HTTP API v1 client for applications in other processes; it imports nothing else of smartmail."""

from smartmail.client.client import Client
from smartmail.client.errors import (
    ApiError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    RateLimited,
    ServerError,
    SmartMailError,
    Unauthorized,
    ValidationFailed,
)

__all__ = [
    "ApiError",
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "NotFound",
    "RateLimited",
    "ServerError",
    "SmartMailError",
    "Unauthorized",
    "ValidationFailed",
]
