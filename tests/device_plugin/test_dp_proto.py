"""Our own .proto files: generated code up to date, and the wire contract identical to the kubelet's.

The kubelet's published api.proto files are read from the Go module cache (present wherever the
Go harness or the Kubernetes binaries were built) and compared field by field: package, services,
methods with their streaming flags, messages, field names, numbers, types and labels.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from vnpu.device_plugin.proto import api_pb2, generate, podresources_pb2

KUBELET_MODULE = "k8s.io/kubelet@v0.34.4"
UPSTREAM = {
    "deviceplugin": (api_pb2, "pkg/apis/deviceplugin/v1beta1/api.proto"),
    "podresources": (podresources_pb2, "pkg/apis/podresources/v1/api.proto"),
}


def test_generated_modules_match_the_protos():
    assert generate.stale_files() == [], "run: python -m vnpu.device_plugin.proto.generate"


def _kubelet_module() -> Path:
    """The k8s.io/kubelet module's source, from the Go module cache wherever ``go`` keeps it
    (GOMODCACHE, GOPATH), downloaded from the module proxy if missing: the way CI finds it, never a
    skip."""
    download = subprocess.run(
        ["go", "mod", "download", "-json", KUBELET_MODULE],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "GOFLAGS": "-mod=mod"},
    )
    assert download.returncode == 0, f"go mod download {KUBELET_MODULE}: {download.stderr or download.stdout}"
    return Path(json.loads(download.stdout)["Dir"])


def _parse_proto(text: str) -> tuple[str, dict, dict]:
    """(package, {service: {method: (in, out, streams)}}, {message: {field: (number, type, repeated)}})."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"\[\s*\(gogoproto\.[^\]]*\]", "", text)  # older releases carried gogo field options
    package = re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.M).group(1)
    services = {}
    for name, body in re.findall(r"service\s+(\w+)\s*\{(.*?)\n\}", text, re.S):
        services[name] = {
            m: (i, o, bool(stream))
            for m, i, stream, o in re.findall(
                r"rpc\s+(\w+)\s*\(\s*(\w+)\s*\)\s*returns\s*\(\s*(stream\s+)?(\w+)\s*\)", body
            )
        }
    messages = {}
    for name, body in re.findall(r"message\s+(\w+)\s*\{(.*?)\}", text, re.S):
        fields = {}
        for label, ftype, fname, number in re.findall(
            r"^\s*(repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", body, re.M
        ):
            fields[fname] = (int(number), ftype.replace(" ", ""), bool(label))
        messages[name] = fields
    return package, services, messages


_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_UINT64: "uint64",
}


def _describe(module) -> tuple[str, dict, dict]:
    fd = module.DESCRIPTOR
    services = {
        s.name: {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in s.methods}
        for s in fd.services_by_name.values()
    }
    messages = {}
    for msg in fd.message_types_by_name.values():
        fields = {}
        for f in msg.fields:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                key, value = f.message_type.fields
                ftype, repeated = f"map<{_SCALARS[key.type]},{_SCALARS[value.type]}>", False
            elif f.message_type is not None:
                ftype, repeated = f.message_type.name, f.is_repeated
            else:
                ftype, repeated = _SCALARS[f.type], f.is_repeated
            fields[f.name] = (f.number, ftype, repeated)
        messages[msg.name] = fields
    return fd.package, services, messages


@pytest.mark.parametrize("which", sorted(UPSTREAM))
def test_wire_contract_equals_the_kubelets(which):
    module, rel = UPSTREAM[which]
    upstream = _kubelet_module() / rel
    assert _describe(module) == _parse_proto(upstream.read_text())
