"""The public face: __all__, lazy loading, light import, telemetry wiring, secrets."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

import genfan


def test_all_names_resolve() -> None:
    for name in genfan.__all__:
        assert getattr(genfan, name) is not None, name
    assert sorted(set(genfan.__all__)) == sorted(genfan.__all__), "duplicates in __all__"


def test_unknown_attribute_raises() -> None:
    with pytest.raises(AttributeError):
        _ = genfan.DoesNotExist  # type: ignore[attr-defined]


def test_import_is_light() -> None:
    code = (
        "import sys, genfan; heavy = [m for m in ('vllm', 'torch', 'ray', 'openai', 'anthropic', "
        "'transformers', 'httpx', 'structlog', 'rich', 'typer') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _provider_imports(tree: ast.Module) -> list[tuple[int, bool]]:
    """``(line, at module level)`` of every import of provider code in a module."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] in ("genfan_providers", "providers") for n in names):
            found.append((node.lineno, id(node) in top))
    return found


def test_genfan_never_imports_providers() -> None:
    """The core never imports provider code (the registry loads it by name); the CLI, a thin
    user, imports the local engine inside its commands only, so ``genfan`` works without it."""
    import pathlib

    root = pathlib.Path(genfan.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        in_cli = path.relative_to(root).parts[0] == "cli"
        for line, module_level in _provider_imports(ast.parse(path.read_text(), str(path))):
            if module_level or not in_cli:
                offenders.append(f"{path.relative_to(root)}:{line}")
    assert offenders == []


def test_the_cli_without_genfan_providers_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`genfan local ...` without the providers distribution: one line, exit 2, no traceback."""
    from typer.testing import CliRunner

    from genfan.cli import app

    for name in ("genfan_providers", "genfan_providers.vllm"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ModuleNotFoundError
    for command in (["local", "prepare", "--quiet"], ["local", "serve", "--port", "0"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [
            "error: the local engine is not installed: pip install 'genfan[local]' "
            "('genfan[local-cpu]' on a machine without a GPU)"
        ]


def test_resilience_all_names_resolve() -> None:
    import genfan.resilience as resilience

    for name in resilience.__all__:
        assert getattr(resilience, name) is not None, name
    assert sorted(set(resilience.__all__)) == sorted(resilience.__all__), "duplicates in __all__"
    assert {"RedisQuota", "SharedQuotaError"} <= set(resilience.__all__)


def test_shared_rate_limits_need_no_redis_package() -> None:
    # The shared quota store speaks RESP itself (anyio), so it runs on trio too.
    code = "import sys, genfan.resilience; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


FACADES = (
    "genfan",
    "genfan.select",
    "genfan.resilience",
    "genfan.agents",
    "genfan.batching",
    "genfan.schedule",
    "genfan.cost",
    "genfan.serve",
    "genfan.testing",
    "genfan.testserver",
    "genfan.telemetry",
)


def test_every_public_name_has_one_import_path() -> None:
    import importlib
    import types

    homes: dict[int, str] = {}
    for facade in FACADES:
        module = importlib.import_module(facade)
        for name in module.__all__:
            value = getattr(module, name)
            if not isinstance(value, type | types.FunctionType):
                continue
            if not str(value.__module__).startswith("genfan"):
                continue  # a typing construct (JsonValue) or a re-exported third-party name
            path = f"{facade}.{name}"
            assert id(value) not in homes, f"{path} is also {homes[id(value)]}"
            homes[id(value)] = path
            # reprs, pickles and the docs name the path users import from
            assert value.__module__ == facade, f"{path}.__module__ is {value.__module__}"


def test_no_public_module_beside_the_facades() -> None:
    import pkgutil

    public = {m.name for m in pkgutil.iter_modules(genfan.__path__) if not m.name.startswith("_")}
    assert public == {
        "agents",
        "batching",
        "cli",
        "cost",
        "resilience",
        "schedule",
        "select",
        "serve",
        "telemetry",
        "testing",
        "testserver",
    }


def test_dir_lists_the_exports() -> None:
    import genfan.select

    assert dir(genfan) == sorted(genfan.__all__)
    assert "MajorityVote" in dir(genfan.select)
    with pytest.raises(AttributeError, match=r"genfan\.select"):
        _ = genfan.select.Cascade  # type: ignore[attr-defined]
