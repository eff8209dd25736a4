"""The package's import graph keeps its layers: no import circles, no import pointing up, and
a module over 500 lines says in its first lines why it is one concept.

The imports are read with ``ast`` (every import statement, those under ``TYPE_CHECKING`` and
inside functions included: a circle that only type checking or a late import hides is still a
circle). The layers, bottom first:

- the core, ``zerosend`` (everything outside ``zerosend.iscsi``), which never imports the target;
- the target: its native pieces and their stand-ins (``_native``, ``_accel``), then ``wire`` <
  ``storage`` < ``scsi`` < ``session`` < ``service``, then the package's face
  (``zerosend.iscsi`` itself and ``__main__``).

The core names no piece of the target, and the target imports only the public ``zerosend`` API.

A module may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

PYTHON = Path(__file__).resolve().parents[1] / "python"
TARGET = "zerosend.iscsi"
#: The target's native pieces and the one module that imports them: the target's bottom layer.
TARGET_BASE = ("_native", "_accel")
#: The target's layers above its base, bottom first.
TARGET_LAYERS = ("wire", "storage", "scsi", "session", "service")
#: Words that name a piece of the iSCSI target; the core's modules, stub and stand-in say none.
ISCSI_WORDS = re.compile(r"iscsi|crc32c|readrun|readpath|\blun\b|\bcdb\b", re.IGNORECASE)
#: The length over which a module must say why it is one concept, and the words it says it with.
LONG = 500
ONE_CONCEPT = "one concept"
#: Modules a work under way splits; the rule holds for every other one.
LONG_PENDING: frozenset[str] = frozenset()


def modules(root: Path = PYTHON) -> dict[str, Path]:
    """Every module under ``root``'s ``zerosend``, by dotted name (packages by their own name;
    a compiled module by its stub)."""
    found: dict[str, Path] = {}
    for path in sorted((root / "zerosend").rglob("*.py*")):
        if path.suffix == ".pyi" and path.with_suffix(".py").exists():
            continue
        if path.suffix not in (".py", ".pyi"):
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _owner(name: str, known: Iterable[str]) -> str | None:
    """The known module ``name`` is, or lies in (``zerosend._native.crc32c`` -> ``zerosend``)."""
    known = set(known)
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(name: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from P import X`` imports the module P.X when there is one, else a name of P.
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            owner = _owner(target, known)
            if owner is not None and owner != name:
                found.add(owner)
    return found


def graph(root: Path = PYTHON) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    """The rank of a module's layer: the core 0, the target's base 1, its layers 2..6, its
    face 7."""
    if name != TARGET and not name.startswith(TARGET + "."):
        return 0
    rest = name[len(TARGET) + 1 :].split(".") if name != TARGET else []
    if not rest or rest == ["__main__"]:
        return len(TARGET_LAYERS) + 2
    if rest[0] in TARGET_BASE:
        return 1
    if rest[0] not in TARGET_LAYERS:
        raise AssertionError(
            f"{name} is in no layer: put it in one of {TARGET}.{{{','.join(TARGET_LAYERS)}}}"
        )
    return TARGET_LAYERS.index(rest[0]) + 2


def upward(edges: Mapping[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one."""
    return [
        f"{name} ({layer(name)}) imports {target} ({layer(target)})"
        for name, targets in sorted(edges.items())
        for target in sorted(targets)
        if layer(target) > layer(name)
    ]


def circles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def long_without_reason(root: Path = PYTHON) -> list[str]:
    """Modules over ``LONG`` lines whose docstring's first lines do not say why one concept."""
    out = []
    for name, path in modules(root).items():
        text = path.read_text()
        if path.suffix == ".pyi" or text.count("\n") <= LONG or name in LONG_PENDING:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        head = " ".join(doc.splitlines()[:8]).lower()
        if ONE_CONCEPT not in head:
            out.append(f"{name}: {text.count(chr(10))} lines, no '{ONE_CONCEPT}' reason up front")
    return out


def long_rust_without_reason(root: Path) -> list[str]:
    """Rust files over ``LONG`` lines (their unit tests, at the end, not counted) whose first
    ``//!`` lines do not say why they are one concept."""
    out = []
    for path in sorted(root.rglob("*.rs")):
        if "target" in path.relative_to(root).parts:
            continue
        code = path.read_text().split("\n#[cfg(test)]\n", 1)[0]
        if code.count("\n") <= LONG:
            continue
        doc = [line for line in code.splitlines() if line.startswith("//!")][:8]
        if ONE_CONCEPT not in " ".join(doc).lower():
            out.append(f"{path.relative_to(root)}: {code.count(chr(10))} lines, no reason up front")
    return out


def test_the_package_has_no_import_circle() -> None:
    assert circles(graph()) == []


def test_no_import_points_up_a_layer() -> None:
    assert upward(graph()) == []


def test_the_core_never_imports_the_target() -> None:
    edges = graph()
    core = [name for name in edges if layer(name) == 0]
    assert core and "zerosend" in core
    assert [(name, target) for name in core for target in edges[name] if layer(target) != 0] == []


def core_iscsi_words(root: Path = PYTHON) -> list[str]:
    """Each line of the core's modules (its stub and pure-Python stand-in included) that names
    a piece of the iSCSI target."""
    return [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in sorted((root / "zerosend").glob("*.py*"))
        if path.suffix in (".py", ".pyi")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ISCSI_WORDS.search(line)
    ]


def private_core_uses(root: Path = PYTHON) -> list[str]:
    """Each place the target reaches past the public ``zerosend`` API: an import of a core
    module other than ``zerosend`` itself, of an underscored name from it, or ``zerosend._x``."""
    found = []
    for name, path in modules(root).items():
        if layer(name) == 0 or path.suffix != ".py":
            continue
        package = name if _is_package(path) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                origins = [(alias.name, "") for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                origin = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                origins = [(origin, alias.name) for alias in node.names]
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "zerosend"
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{where}: zerosend.{node.attr}")
                continue
            else:
                continue
            for origin, imported in origins:
                if origin == TARGET or origin.startswith(TARGET + "."):
                    continue
                if origin == "zerosend" and not (
                    imported.startswith("_") and not imported.startswith("__")
                ):
                    continue
                if origin == "zerosend" or origin.startswith("zerosend."):
                    found.append(f"{where}: {origin} {imported}".rstrip())
    return found


def test_the_core_names_no_piece_of_the_target() -> None:
    assert core_iscsi_words() == []
    import zerosend

    native = zerosend._native
    assert [n for n in dir(native) if ISCSI_WORDS.search(n)] == [], native.__name__


def test_the_target_uses_only_the_public_core_api() -> None:
    assert private_core_uses() == []


def test_a_long_module_says_why_it_is_one_concept() -> None:
    assert long_without_reason() == []
    assert long_rust_without_reason(PYTHON.parent / "rust") == []


def test_the_rust_check_counts_code_not_unit_tests(tmp_path: Path) -> None:
    (tmp_path / "short.rs").write_text("fn f() {}\n" * 10 + "#[cfg(test)]\n" + "//\n" * LONG)
    (tmp_path / "long.rs").write_text("fn f() {}\n" * (LONG + 1))
    (tmp_path / "said.rs").write_text("//! One concept: because.\n" + "fn f() {}\n" * (LONG + 1))
    assert long_rust_without_reason(tmp_path) == [f"long.rs: {LONG + 1} lines, no reason up front"]


# -- the checks themselves catch what they are for, on a small package written here --


def _package(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "zerosend" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_catch_an_upward_import_a_circle_and_a_long_module(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "_core.py": "",
            "iscsi/__init__.py": "from .service.target import Target\n",
            "iscsi/wire/__init__.py": "",
            "iscsi/wire/pdu.py": "from ..session import reads\n",  # up
            "iscsi/session/__init__.py": "",
            "iscsi/session/reads.py": "from ..wire import pdu\nfrom .. import session\n",
            "iscsi/service/__init__.py": "",
            "iscsi/service/target.py": "from ... import _core\n" + "x = 1\n" * (LONG + 1),
        },
    )
    edges = graph(root)
    assert edges["zerosend.iscsi.wire.pdu"] == {"zerosend.iscsi.session.reads"}
    assert edges["zerosend.iscsi.service.target"] == {"zerosend._core"}
    assert upward(edges) == ["zerosend.iscsi.wire.pdu (2) imports zerosend.iscsi.session.reads (5)"]
    assert circles(edges) == [["zerosend.iscsi.session.reads", "zerosend.iscsi.wire.pdu"]]
    assert long_without_reason(root) == [
        f"zerosend.iscsi.service.target: {LONG + 2} lines, no 'one concept' reason up front"
    ]
    # The target reaching past the public core API, and the core naming the target.
    (root / "zerosend" / "iscsi" / "wire" / "pdu.py").write_text(
        "import zerosend\nfrom zerosend._core import x\nfrom ... import _core\n"
        "from zerosend import Socket, _core\nzerosend._core.y\nzerosend.__version__\n"
    )
    assert private_core_uses(root) == [
        "zerosend.iscsi.service.target:1: zerosend _core",
        "zerosend.iscsi.wire.pdu:2: zerosend._core x",
        "zerosend.iscsi.wire.pdu:3: zerosend _core",
        "zerosend.iscsi.wire.pdu:4: zerosend _core",
        "zerosend.iscsi.wire.pdu:5: zerosend._core",
    ]
    (root / "zerosend" / "_core.py").write_text("def crc32c(): ...\n")
    assert core_iscsi_words(root) == ["zerosend/_core.py:1: def crc32c(): ..."]
    # A core module importing the target points up too.
    (root / "zerosend" / "_core.py").write_text("import zerosend.iscsi\n")
    assert "zerosend._core (0) imports zerosend.iscsi (7)" in upward(graph(root))
