"""An import stand-in for ``torchvision``, for the CPU test environment only.

The registry's torchvision wheels are CUDA builds that fail to import next to the CPU
``torch==2.13.0`` (``operator torchvision::nms does not exist``), and installing them with their
dependencies replaces torch. ``open-clip-torch`` and ``timm`` are therefore installed with
``--no-deps`` (see the Makefile), but both import torchvision at module level (transforms,
``FrozenBatchNorm2d``) although their models never use it.

:func:`install` puts a stand-in into ``sys.modules`` when no real torchvision is installed. Every
name looked up in it (``torchvision.transforms.InterpolationMode.BICUBIC``, ...) is a placeholder
class, so module-level imports, default arguments, ``isinstance`` checks and subclassing work; any
*use* (calling or instantiating a placeholder) raises :class:`TorchvisionStandInUsed`. So every
number a test checks comes from open_clip's / timm's own model code, never from the stand-in.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class TorchvisionStandInUsed(RuntimeError):
    """Raised when code under test really uses torchvision (which the stand-in cannot provide)."""


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise TorchvisionStandInUsed(f"{cls.__qualname__} was called, but torchvision is only a test stand-in here")


def _placeholder(qualname: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname, "__module__": "torchvision"})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+test-stand-in"
        module.IS_TEST_STAND_IN = True
        return module

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


_FINDER = _StandInFinder()


def install() -> bool:
    """Install the stand-in unless a real torchvision is importable; returns whether it was installed."""
    if _FINDER in sys.meta_path:
        return True
    if importlib.util.find_spec("torchvision") is not None:
        return False
    sys.meta_path.insert(0, _FINDER)
    return True
