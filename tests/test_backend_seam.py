"""The model seam: only ``interlatent/backends/`` tells kinds of model apart. Everywhere else a
model is handed to :func:`interlatent.backends.make_backend` and used through its backend."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "interlatent"
MODEL_CLASSES = {"HookedTransformer", "HookedEncoder", "TransformerBridge", "HookedRootModule", "PreTrainedModel",
                 "Module"}
#: attributes whose presence tells one kind of model from another
SNIFFED = {"cfg", "config", "hook_dict", "run_with_hooks", "blocks", "attention_dir", "model_type"}
MODEL_NAMES = ("model", "llm", "net", "policy_model")


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def _is_model(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id.lower().endswith(MODEL_NAMES)


def model_type_tests(source: str) -> list[tuple[int, str]]:
    """(line, what) for each test of a model's kind in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.lstrip("_").startswith(
                ("is_hooked", "is_hf", "is_tl", "is_bridge", "is_encoder")):
            found.append((node.lineno, f"def {node.name}"))
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        if node.func.id == "isinstance" and len(node.args) == 2 and _names(node.args[1]) & MODEL_CLASSES:
            found.append((node.lineno, ast.unparse(node)))
        if node.func.id in ("hasattr", "getattr") and len(node.args) >= 2 and _is_model(node.args[0]):
            attr = node.args[1]
            if isinstance(attr, ast.Constant) and attr.value in SNIFFED:
                found.append((node.lineno, ast.unparse(node)))
        if node.func.id == "type" and node.args and _is_model(node.args[0]):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_checker_finds_each_kind_of_model_type_test():
    sample = ("def _is_hooked_transformer(model):\n    return isinstance(model, HookedTransformer)\n"
              "x = hasattr(model, 'hook_dict')\ny = type(llm).__name__.endswith('LMHeadModel')\n"
              "z = isinstance(m, nn.Module)\n")
    assert len(model_type_tests(sample)) == 5
    assert model_type_tests("isinstance(value, Tensor)\ngetattr(tok, 'bos_token_id', None)\n") == []


def test_no_model_type_test_outside_the_backends_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("backends", "gym"):  # gym policies are plain nn.Modules of their own seam
            continue
        offenders += [f"{rel}:{line}: {what}" for line, what in model_type_tests(path.read_text())]
    assert offenders == [], "model kinds are told apart outside interlatent/backends/:\n" + "\n".join(offenders)


def test_patching_and_collection_import_the_backend_package():
    for rel in ("patch/core.py", "patch/activation.py", "patch/reach.py", "patch/measure.py", "llm/collector.py"):
        tree = ast.parse((PACKAGE / rel).read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "interlatent.backends" in modules, rel
        assert "interlatent.llm.backends" not in modules, rel
