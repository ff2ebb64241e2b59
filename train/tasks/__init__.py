"""The task registry: ``task:`` name -> the module and class implementing it.

Adding a task = one new file ``train/tasks/<name>.py`` with a :class:`Task` subclass (the protocol
is documented in ``base.py``) plus one line below. Modules are imported on first use only.
Importing this package installs :func:`get_task` as the task lookup of ``config.parse_config``
(which does not import the tasks: config.py is a leaf of the import graph).
"""

from __future__ import annotations

import importlib

from vlmcore.train.config import UnknownTaskError, install_task_lookup
from vlmcore.train.tasks.base import EvalContext, SampleEncoder, Task

# name -> "module:Class" (relative to this package, imported lazily); tests may also map a name
# to a Task subclass directly.
REGISTRY: dict[str, str | type[Task]] = {
    "clip": ".clip:ClipTask",
    "flamingo": ".flamingo:FlamingoTask",
    "frozen": ".frozen:FrozenTask",
    "siglip": ".siglip:SiglipTask",
    "vilbert": ".vilbert:VilbertTask",
    "vlbert": ".vlbert:VlbertTask",
    "blip2_stage1": ".blip2_stage1:Blip2Stage1Task",
    "blip2_stage2": ".blip2_stage2:Blip2Stage2Task",
    "blip_pretrain": ".blip_pretrain:BlipPretrainTask",
    "blip_retrieval": ".blip_retrieval:BlipRetrievalTask",
    "blip_caption": ".blip_caption:BlipCaptionTask",
    "blip_vqa": ".blip_vqa:BlipVqaTask",
    "blip_nlvr": ".blip_nlvr:BlipNlvrTask",
}


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(REGISTRY)


def get_task(name: str) -> type[Task]:
    """The :class:`Task` subclass registered as ``name``; raises :class:`UnknownTaskError` listing the names."""
    if name not in REGISTRY:
        raise UnknownTaskError(f"unknown task {name!r} (registered: {', '.join(task_names())})")
    target = REGISTRY[name]
    if isinstance(target, str):
        module_name, _, class_name = target.partition(":")
        target = getattr(importlib.import_module(module_name, __name__), class_name)
    if not (isinstance(target, type) and issubclass(target, Task)) or target.name != name:
        raise TypeError(f"REGISTRY[{name!r}] must be a Task subclass whose name is {name!r}, got {target!r}")
    return target


install_task_lookup(get_task)

__all__ = ["REGISTRY", "EvalContext", "SampleEncoder", "Task", "UnknownTaskError", "get_task", "task_names"]
