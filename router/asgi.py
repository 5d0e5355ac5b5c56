"""The ASGI types the router speaks; starlette's own names, so handlers read the same."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send"]
