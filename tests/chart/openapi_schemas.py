"""JSON schemas for kubeconform, made from the test apiserver's own /openapi/v2.

kubeconform's default schemas live on the internet; these come from the pinned Kubernetes release
we run (plus our CRDs), one file per (group, kind, version) the chart renders, laid out for
``-schema-location '<dir>/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json'``. Objects are
closed (``additionalProperties: false``) unless Kubernetes keeps unknown fields, so a typo in the
chart is an error — what kubeconform's "-strict" schemas do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref.rsplit("/", 1)[-1]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _closure(definitions: dict[str, Any], root: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in definitions:
            continue
        seen[name] = definitions[name]
        todo.extend(_refs(definitions[name]))
    return seen


def _tighten(node: Any) -> Any:
    if isinstance(node, dict):
        if node.get("format") == "int-or-string":
            return INT_OR_STRING
        out = {k: _tighten(v) for k, v in node.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_tighten(v) for v in node]
    return node


def write_schemas(openapi_v2: dict[str, Any], wanted: set[tuple[str, str]], out_dir: Path) -> list[Path]:
    """Write schemas for ``wanted`` (apiVersion, kind) pairs; returns the files written."""
    definitions = dict(openapi_v2["definitions"])
    for name in definitions:
        if name.endswith(".Quantity"):
            definitions[name] = QUANTITY
    by_gvk: dict[tuple[str, str], str] = {}
    for name, schema in definitions.items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            by_gvk[(api_version, gvk["kind"])] = name
    written = []
    for api_version, kind in sorted(wanted):
        name = by_gvk.get((api_version, kind))
        if name is None:
            continue
        closure = {k: _tighten(v) for k, v in _closure(definitions, name).items()}
        schema = {"$ref": f"#/definitions/{name}", "definitions": closure}
        group, _, version = api_version.rpartition("/")
        path = out_dir / (group or version) / f"{kind.lower()}_{version}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema))
        written.append(path)
    return written
