"""The import rules of pyproject.toml's [tool.importlinter] contracts hold for every module:
dependencies point down the layer list, and only castore.rpc (and the composition root and
CLI above it) import grpc or the generated protobuf code."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "castore"


def _contracts() -> tuple[list[list[str]], list[str], list[str]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers: list[list[str]] = []
    sources: list[str] = []
    forbidden: list[str] = []
    for c in cfg["contracts"]:
        if c["type"] == "layers":
            layers = [[m.strip() for m in layer.split("|")] for layer in c["layers"]]
        elif c["type"] == "forbidden":
            sources, forbidden = c["source_modules"], c["forbidden_modules"]
    return layers, sources, forbidden


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if not name.startswith("castore._proto"):
            out[name] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def _owner(name: str, roots: list[str]) -> str | None:
    for r in roots:
        if name == r or name.startswith(r + "."):
            return r
    return None


def test_every_module_sits_in_a_layer() -> None:
    layers, _, _ = _contracts()
    roots = [m for layer in layers for m in layer]
    unplaced = [m for m in _modules() if m not in ("castore", "castore.__main__")
                and _owner(m, roots) is None]
    assert not unplaced, f"modules outside the layer contract: {unplaced}"


def test_dependencies_point_down() -> None:
    layers, _, _ = _contracts()
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    roots = list(level)
    broken = []
    for module, path in _modules().items():
        mine = _owner(module, roots)
        if mine is None:
            continue
        for imp in _imports(path, module):
            theirs = _owner(imp, roots)
            if theirs is None or theirs == mine:
                continue
            if level[theirs] <= level[mine]:
                broken.append(f"{module} imports {imp}")
    assert not broken, "imports against the layer order:\n" + "\n".join(sorted(broken))


def test_only_rpc_imports_grpc_and_generated_code() -> None:
    _, sources, forbidden = _contracts()
    broken = []
    for module, path in _modules().items():
        if _owner(module, sources) is None:
            continue
        for imp in _imports(path, module):
            if _owner(imp, forbidden) is not None:
                broken.append(f"{module} imports {imp}")
    assert not broken, "\n".join(sorted(broken))


def test_the_check_catches_a_planted_violation(tmp_path: Path) -> None:
    planted = tmp_path / "store.py"
    planted.write_text("import grpc\nfrom castore.rpc import client\n")
    imports = _imports(planted, "castore.store.planted")
    _, _, forbidden = _contracts()
    assert any(_owner(i, forbidden) for i in imports)
    layers, _, _ = _contracts()
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    assert level["castore.rpc"] < level["castore.store"]


def test_the_package_facade_loads_the_store_on_first_use() -> None:
    import castore
    import castore.store
    assert castore.MemoryStore is castore.store.MemoryStore
    assert castore.BlobStore is castore.store.BlobStore
    try:
        castore.NoSuchName  # noqa: B018
    except AttributeError:
        pass
    else:
        raise AssertionError("castore.NoSuchName resolved")


def test_a_client_of_the_daemon_does_not_load_the_store() -> None:
    """A CLI run that talks to the daemon imports the client, never the store (nor zstandard
    or lmdb): every CLI run is a fresh process, and its start-up is the wait for the daemon."""
    import subprocess
    import sys
    code = ("import sys, castore, castore.cli, castore.rpc.client; castore.cli.build_parser(); "
            "print(sorted(m for m in ('castore.store', 'castore.mounts', 'zstandard', 'lmdb') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", out
