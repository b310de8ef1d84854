"""The task registry: a card's `task:` string -> the Task that handles it.

The built-in tasks (`ct-slices`, `wsi-tiles`, `ct-segmentation`) register themselves when
this registry is first asked. A task from outside befund is a module that calls
`register(...)` when imported; the node imports the modules named by the config key
`task_modules` at start, in every process that reads cards (service/config.py), so nothing
in service/ names a task.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.model_card import CardError, ModelCard

if TYPE_CHECKING:
    from pipelines.tasks.base import Task

BUILTIN_MODULES = ("pipelines.tasks.ct_slices", "pipelines.tasks.wsi_tiles",
                   "pipelines.tasks.ct_segmentation")
TASK_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

_tasks: dict[str, Task] = {}
_builtins_loaded = False
_registering_modules: set[str] = set()  # task_modules whose import registered a task


class TaskError(ValueError):
    """A task or task module that cannot be registered; the message names it."""


def register(task: Task) -> Task:
    """Make `task` the handler of cards whose `task:` is `task.name`; returns it.

    A second task under a name already taken is refused (two modules claiming `ct-slices`
    would make the node's behaviour depend on import order).
    """
    from pipelines.tasks.base import Task as TaskProtocol

    name = getattr(task, "name", None)
    if not isinstance(name, str) or not TASK_NAME_RE.match(name):
        raise TaskError(f"task {task!r}: name {name!r} must be lower-case letters, digits and '-'")
    missing = [m for m in dir(TaskProtocol) if not m.startswith("_") and not hasattr(task, m)]
    if missing:
        raise TaskError(f"task {name}: {type(task).__name__} does not implement the Task protocol "
                        f"(missing {', '.join(sorted(missing))})")
    held = _tasks.get(name)
    if held is not None and type(held) is not type(task):
        raise TaskError(f"task {name} is already registered by {type(held).__module__}; "
                        f"{type(task).__module__} cannot register it again")
    _tasks[name] = task
    return task


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def known_tasks() -> tuple[str, ...]:
    _load_builtins()
    return tuple(sorted(_tasks))


def task_named(name: str, where: str = "task") -> Task:
    """The Task for a card's `task:`; an unknown one is a CardError naming `where` and the
    tasks this process knows."""
    _load_builtins()
    task = _tasks.get(name)
    if task is None:
        raise CardError(f"{where}: {name!r} is not a known task (known: {', '.join(known_tasks())}); "
                        "a task from outside befund is registered by naming its module in the "
                        "config key task_modules")
    return task


def task_of(card: ModelCard) -> Task:
    """The Task that handles `card`."""
    return task_named(card.task, f"{card.folder}/card.yaml.task")


def import_task_modules(modules: Sequence[str]) -> None:
    """Import each dotted module name (the config's `task_modules`); each must register a task.

    Raises TaskError naming the module: a malformed name, an import that fails, or a module
    that registered nothing.
    """
    import sys

    _load_builtins()
    for module in modules:
        if not MODULE_RE.match(module):
            raise TaskError(f"task_modules: {module!r} is not a dotted module name "
                            "(e.g. mysite.tasks.ct_perfusion)")
        if module not in sys.modules:
            before = dict(_tasks)
            try:
                importlib.import_module(module)
            except TaskError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of a plugin's import is reported by name
                raise TaskError(f"task_modules: cannot import {module}: {type(exc).__name__}: {exc}") from exc
            if _tasks != before:
                _registering_modules.add(module)
        if module not in _registering_modules and not any(
                type(t).__module__ == module for t in _tasks.values()):
            raise TaskError(f"task_modules: {module} registered no task (call "
                            "pipelines.tasks.register(YourTask()) in it)")
