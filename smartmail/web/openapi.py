"""The OpenAPI document's completion: problem responses per operation and links from creates."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI

from smartmail.web import problems


def complete(app: FastAPI) -> None:
    """The OpenAPI document declares each operation's problem responses (problems.declare_responses)
    and links each create to the operations on what it made (link_creates)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()  # cached in app.openapi_schema, completed here in place
            problems.declare_responses(document)
            link_creates(document)
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def link_creates(document: dict[str, Any]) -> None:
    """OpenAPI links (3.1 section 4.8.20) from each create (POST on a collection, PUT on an item) to
    the operations on one item of it, its key taken from the created body: clients and a fuzzer's
    stateful phase follow them (create a contact, then fetch it)."""
    paths, components = document["paths"], document.get("components", {}).get("schemas", {})
    for path, operations in paths.items():
        for method, operation in operations.items():
            created = next((r for s, r in operation.get("responses", {}).items() if s.startswith("2")), None)
            if not path.startswith("/v1/") or method not in ("post", "put") or created is None:
                continue
            reference = created.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
            fields = components.get(reference.rsplit("/", 1)[-1], {}).get("properties", {})
            collection = path if method == "post" else path.rsplit("/", 1)[0]
            if "{" in collection:
                continue
            for target, target_operations in paths.items():
                item = re.fullmatch(re.escape(collection) + r"/\{(\w+)\}(/\w+)?", target)
                if item is None:
                    continue
                name = item.group(1)
                field = name if name in fields else "id" if "id" in fields and name.endswith(("id", "key")) else None
                for target_method, target_operation in target_operations.items():
                    if field is None or target_operation is operation:
                        continue
                    link = re.sub(r"\W+", "_", f"{target_method} {target}").strip("_")
                    created.setdefault("links", {})[link] = {
                        "operationId": target_operation["operationId"],
                        "parameters": {name: f"$response.body#/{field}"},
                    }
