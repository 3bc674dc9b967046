"""The public surface: one flat namespace, public paths in reprs, no import cycle."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import kling_async

PRIVATE = [
    name
    for module in pkgutil.iter_modules(kling_async.__path__)
    if (name := module.name).startswith("_") and not name.startswith("__")
]


def private_modules() -> list[ModuleType]:
    return [importlib.import_module(f"kling_async.{name}") for name in PRIVATE]


def test_each_private_module_s_all_is_what_the_package_exports_from_it() -> None:
    exported = set(kling_async.__all__)
    listed: set[str] = set()
    for module in private_modules():
        names = set(getattr(module, "__all__", ()))
        assert names <= exported, f"{module.__name__} lists unexported {sorted(names - exported)}"
        listed |= names
    # Everything exported comes from some module's public list (the version aside).
    assert exported - listed == {"__version__"}


def test_exported_names_say_kling_async_in_their_reprs() -> None:
    for name in kling_async.__all__:
        thing = getattr(kling_async, name)
        if isinstance(thing, type) or (callable(thing) and hasattr(thing, "__module__")):
            module = getattr(thing, "__module__", "kling_async")
            assert not module.startswith("kling_async._"), f"{name}: {module}"
    assert repr(kling_async.Task).endswith("'kling_async.Task'>")


def test_attrs_models_still_structure_after_their_module_changed() -> None:
    # Their string annotations were resolved before __module__ moved.
    task = kling_async.Task(task_id="t", status=kling_async.TaskStatus.SUCCEED)
    assert task.to_dict()["task_id"] == "t"


def test_every_module_imports_on_its_own() -> None:
    # As aiohttp's test_circular_imports: each module first, in a fresh
    # interpreter, so an import cycle that a lucky order hides shows up.
    names = [
        module.name
        for module in pkgutil.walk_packages(kling_async.__path__, "kling_async.")
        if not module.name.endswith("__main__")
    ]
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('kling_async')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *names], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert len(names) > 30


TYPED_USE = """
import kling_async

async def use(client: kling_async.Client) -> None:
    await client.images.generate(prompt="p", aspect_ratio="5:1")
    await client.images.generate(prompt="p", resolution="4k", model_name="any-new-model")
    kling_async.ImageGenerationRequest(prompt="p", aspect_ratio="1:1", image_reference="face")
"""


def test_field_values_are_literal_types_that_a_type_checker_checks(tmp_path: Path) -> None:
    """Editors complete the documented values; mypy rejects others, while a model
    name stays any string (Kling adds models)."""
    from mypy import api

    source = tmp_path / "typed_use.py"
    source.write_text(TYPED_USE, encoding="utf-8")
    out, _err, status = api.run(
        [str(source), "--strict", "--cache-dir", str(tmp_path / ".mypy_cache")]
    )
    assert status == 1, out
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert len(errors) == 2, out
    assert "typed_use.py:5:" in errors[0]
    assert '"aspect_ratio"' in errors[0]
    assert "typed_use.py:6:" in errors[1]
    assert '"resolution"' in errors[1]


def test_unknown_values_still_get_the_runtime_error_naming_the_allowed_ones() -> None:
    with pytest.raises(
        kling_async.ValidationError, match=r"aspect_ratio: must be one of 1:1, 16:9"
    ):
        kling_async.ImageGenerationRequest(prompt="p", aspect_ratio="5:1")  # type: ignore[arg-type]
