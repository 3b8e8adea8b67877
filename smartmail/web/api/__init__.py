"""The HTTP API, version 1: routers per resource under /v1, authenticated by API keys with scopes."""
