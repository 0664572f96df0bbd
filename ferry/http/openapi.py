"""The OpenAPI 3.1 document, built from the route table (so it lists exactly the routes)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ferry

if TYPE_CHECKING:
    from ferry.http.server import Route

_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}

_RAW: dict[str, Any] = {
    "type": "object",
    "required": ["mail_from", "rcpt_to", "data"],
    "properties": {
        "mail_from": {"type": "string", "description": "envelope sender; '' for <>"},
        "rcpt_to": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "data": {"type": "string", "contentEncoding": "base64", "description": "RFC 5322"},
    },
}

_STRUCTURED: dict[str, Any] = {
    "type": "object",
    "required": ["from"],
    "properties": {
        "from": {"type": "string"},
        "to": {"type": "array", "items": {"type": "string"}},
        "cc": {"type": "array", "items": {"type": "string"}},
        "bcc": {"type": "array", "items": {"type": "string"}},
        "subject": {"type": "string"},
        "text": {"type": "string"},
        "html": {"type": "string"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "attachments": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["filename", "content"],
                "properties": {
                    "filename": {"type": "string"},
                    "content_type": {"type": "string"},
                    "content": {"type": "string", "contentEncoding": "base64"},
                },
            },
        },
    },
}

_COMMON: dict[str, Any] = {
    "priority": {"enum": ["low", "normal", "high", "urgent"]},
    "notify": {"type": "array", "items": {"enum": ["NEVER", "SUCCESS", "FAILURE", "DELAY"]}},
    "envid": {"type": "string", "maxLength": 100},
    "route": {"type": "string", "description": "direct, mx:host[:port] or a smart host"},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
}

_ACCEPTED: dict[str, Any] = {
    "type": "object",
    "required": ["id", "recipients"],
    "properties": {
        "id": {"type": "string"},
        "recipients": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"address": {"type": "string"}, "status": {"type": "string"}},
            },
        },
    },
}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.handler.__name__,
        "responses": {
            str(route.status): {"description": "success"},
            "default": {
                "description": "an error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    params = re.findall(r"{(\w+)}", route.path)
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    if route.scope is None:
        op["security"] = []
    else:
        op["description"] = f"Needs a token with the `{route.scope}` scope (or `admin`)."
    if route.method == "POST" and route.path == "/v1/messages":
        op["parameters"] = [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 255},
            }
        ]
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": "#/components/schemas/RawMessage"},
                            {"$ref": "#/components/schemas/StructuredMessage"},
                        ]
                    }
                }
            },
        }
        op["responses"]["202"] = {
            "description": "queued durably (fsynced), as SMTP's 250",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
        }
    return op


def document(routes: Iterable[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ferry relay API", "version": ferry.__version__},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": _ERROR,
                "RawMessage": {**_RAW, "properties": {**_RAW["properties"], **_COMMON}},
                "StructuredMessage": {
                    **_STRUCTURED,
                    "properties": {**_STRUCTURED["properties"], **_COMMON},
                },
                "Accepted": _ACCEPTED,
            },
        },
        "security": [{"bearer": []}],
    }
