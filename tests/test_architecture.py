"""The import contract and the size of library files, checked on every test run.

The store (``interlatent/db/**``) sits below everything else: it may import the standard library,
numpy, pandas (only inside functions, so opening a store stays fast), and of Interlatent only
``interlatent.errors``, ``interlatent.naming`` (the layer-name grammar, with the hook names it is
built from), the package's ``__version__`` and its own modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "interlatent"
STORE = PACKAGE / "db"

STORE_MAY_IMPORT = {"interlatent", "interlatent.errors", "interlatent.naming"}  # plus interlatent.db.*
ABOVE_THE_STORE = ("llm", "gym", "analysis", "patch", "vis", "backends")
THIRD_PARTY = {"numpy"}  # at module level; pandas, pyarrow and fsspec only inside functions
LAZY_THIRD_PARTY = {"pandas", "pyarrow", "fsspec"}

MAX_LINES = 550
# Files over MAX_LINES that are being split elsewhere; remove an entry once its file is under the limit.
OVER_THE_LIMIT: set[str] = set()


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, bool, int]]:
    """``(module, at module level, line)`` of every import in ``path``: relative imports resolved,
    and ``from package import module`` counted as importing that module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = root.joinpath(*module.split("."), alias.name)
                is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                found.append((f"{module}.{alias.name}" if is_module else module, id(node) in top_level,
                              node.lineno))
    return found


def _library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_store_imports_nothing_above_it():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = []
    for path in sorted(STORE.rglob("*.py")):
        for module, top, line in _imports(path):
            root = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if root == "interlatent":
                if module in STORE_MAY_IMPORT or module.startswith("interlatent.db"):
                    continue
                wrong.append(where)
            elif root in stdlib or root in THIRD_PARTY:
                continue
            elif root in LAZY_THIRD_PARTY:
                if top:
                    wrong.append(f"{where} at module level (import it inside the function that needs it)")
            else:
                wrong.append(where)
    assert not wrong, "the store may import only the standard library, numpy, pandas (lazily), " \
                      "interlatent.errors, interlatent.naming and interlatent.db.*:\n" + "\n".join(wrong)


@pytest.mark.parametrize("above", ABOVE_THE_STORE)
def test_the_contract_sees_an_import_from_above(tmp_path, above):
    store = tmp_path / "interlatent" / "db"
    store.mkdir(parents=True)
    (store / "codec.py").write_text("")
    (tmp_path / "interlatent" / f"{above}.py").write_text("")
    bad = store / "bad.py"
    bad.write_text(f"from interlatent import {above}\nfrom . import codec\nfrom .codec import x\n"
                   "def f():\n    import pandas\n")
    assert _imports(bad, tmp_path) == [(f"interlatent.{above}", True, 1), ("interlatent.db.codec", True, 2),
                                       ("interlatent.db.codec", True, 3), ("pandas", False, 5)]


def test_opening_the_store_loads_nothing_above_it():
    code = ("import sys, interlatent.db\nfrom interlatent.db import LatentDB\n"
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout.split())
    above = sorted(m for m in loaded if m.split(".")[0] in ("torch", "transformer_lens", "transformers", "pandas")
                   or any(m.startswith(f"interlatent.{a}") for a in ABOVE_THE_STORE))
    assert not above, f"importing interlatent.db loaded {above}"


def test_no_library_file_is_over_the_size_limit():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in _library_files()}
    over = sorted(f"{name} ({n} lines)" for name, n in sizes.items() if n > MAX_LINES and name not in OVER_THE_LIMIT)
    assert not over, f"library files over {MAX_LINES} lines (split them along their responsibilities): {over}"
    shrunk = sorted(f"{name} ({sizes.get(name, 0)} lines)" for name in OVER_THE_LIMIT if sizes.get(name, 0) <= MAX_LINES)
    assert not shrunk, f"remove these from OVER_THE_LIMIT, they are within {MAX_LINES} lines now: {shrunk}"
