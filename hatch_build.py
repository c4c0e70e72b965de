"""Build hook: generate castore/_proto/ from proto/*.proto (run on every install and wheel build).

Manual regeneration after editing a .proto: python hatch_build.py
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # manual run without hatchling installed
    BuildHookInterface = object  # type: ignore[misc,assignment]


def generate(root: Path) -> None:
    from grpc_tools import protoc

    out = root / "castore" / "_proto"
    out.mkdir(exist_ok=True)
    (out / "__init__.py").touch()
    protos = sorted(str(p) for p in (root / "proto").glob("*.proto"))
    rc = protoc.main(["protoc", f"-Icastore/_proto={root / 'proto'}", f"--python_out={root}",
                      f"--pyi_out={root}", f"--grpc_python_out={root}", *protos])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")


class ProtoBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        generate(Path(self.root))


if __name__ == "__main__":
    generate(Path(__file__).parent)
