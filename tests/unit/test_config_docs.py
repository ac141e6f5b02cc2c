"""Every field of every command's config dataclass has a docstring: they are the one place an
option is explained (the command line's help is made from them), so a field without one fails
here. Found by reading the source (``ast``), so nothing heavy is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "src" / "rewardloop"
KNOWN = {"SFTConfig", "RewardConfig", "DPOConfig", "GRPOConfig", "PPOConfig", "LoopConfig",
         "EvalConfig", "GenerateConfig"}


def _is_frozen_dataclass(node: ast.ClassDef) -> bool:
    for deco in node.decorator_list:
        if (isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "dataclass"
                and any(k.arg == "frozen" and getattr(k.value, "value", False) is True
                        for k in deco.keywords)):
            return True
    return False


def undocumented_fields(source: str) -> dict[str, list[str]]:
    """``{ConfigClass: [field without a docstring, ...]}`` for the frozen ``*Config`` dataclasses
    of ``source`` and the frozen dataclasses they inherit from. A field's docstring is a string
    expression right after its annotated assignment."""
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)
               and _is_frozen_dataclass(n)}
    wanted = {name for name in classes if name.endswith("Config")}
    for name in list(wanted):
        wanted |= {b.id for b in classes[name].bases
                   if isinstance(b, ast.Name) and b.id in classes}
    out: dict[str, list[str]] = {}
    for name in sorted(wanted):
        body = classes[name].body
        missing = []
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            after = body[i + 1] if i + 1 < len(body) else None
            if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str) and after.value.value.strip()):
                missing.append(stmt.target.id)
        out[name] = missing
    return out


def test_every_config_field_has_a_docstring() -> None:
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, missing in undocumented_fields(path.read_text()).items():
            found[f"{path.relative_to(PACKAGE)}:{name}"] = missing
    assert KNOWN <= {key.split(":")[1] for key in found}, sorted(found)
    assert {key: m for key, m in found.items() if m} == {}


def test_a_field_without_a_docstring_is_found() -> None:
    source = '''
from dataclasses import dataclass

@dataclass(frozen=True)
class BaseOptions:
    seed: int = 0

@dataclass(frozen=True)
class ToyConfig(BaseOptions):
    """A command's options."""

    lr: float = 1e-3
    """Learning rate."""
    steps: int = 10
    # a comment is not a docstring
    name: str = "x"
    """Run name."""

@dataclass
class MutableConfig:  # not frozen: not a command config
    free: int = 0
'''
    assert undocumented_fields(source) == {"BaseOptions": ["seed"], "ToyConfig": ["steps"]}
