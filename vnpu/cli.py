"""The ``vnpu`` command: one entry point, one subcommand per component.

vnpu runs many inference models densely on NPUs in Kubernetes. Components live in their own folders
at the top of the repository and are installed as subpackages of the namespace package ``vnpu``:
``vnpu.operator`` (kopf operator), ``vnpu.device_plugin`` (kubelet device plugin), ``vnpu.runtime``
(shared-weight serving runtime), ``vnpu.gateway`` (one OpenAI endpoint for all models) and
``vnpu.bench``. The shared pieces live in ``vnpu/``: the stable API
names (:mod:`vnpu.api`), the node inventory format (:mod:`vnpu.inventory`), logging, this CLI and the
local control plane used by tests and ``vnpu up`` (:mod:`vnpu.cluster`).

Subcommands are imported lazily so ``vnpu operator`` never imports torch and ``vnpu --help`` is fast.
Each target is a ``main(argv) -> int`` with its own argparse (``prog="vnpu <command>"``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: command -> (module, one-line help). Modules expose ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "operator": ("vnpu.operator.main", "run the InferenceModel operator (kopf) against the current cluster"),
    "device-plugin": (
        "vnpu.device_plugin.main",
        "run the kubelet device plugin advertising vnpu.io/memory-<index> per device",
    ),
    "runtime": ("vnpu.runtime.main", "model runtime: `weights-holder` (shared weights) and `serve` (HTTP)"),
    "gateway": ("vnpu.gateway.main", "one OpenAI endpoint for every model: route by name, pick a replica"),
    "up": ("vnpu.cluster.up", "start a local control plane with simulated NPU nodes, place and serve models"),
    "down": ("vnpu.cluster.up", "stop what `vnpu up` started"),
    "cluster": ("vnpu.cluster.main", "build the Kubernetes binaries or run a bare local control plane"),
    "bench": ("vnpu.bench.main", "run a benchmark suite and write JSON, a table and a PNG plot"),
}

USAGE = """usage: vnpu <command> [options]

vnpu runs many inference models densely on NPUs in Kubernetes.

commands:
{commands}

Run `vnpu <command> --help` for the options of one command.
"""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"vnpu {version('vnpu')}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"vnpu: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    if command in ("up", "down"):
        return int(module.main([command, *rest]))
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
