"""OpenFlamingo's own ``eval/evaluate.py`` (open-flamingo 2.0.1, installed ``--no-deps``), runnable on CPU.

``evaluate.py`` is a script: it imports its siblings as top-level modules (``import utils``) and
pulls in the whole training stack (einops, open_clip with torchvision, pycocoevalcap, sklearn,
nltk, horovod). None of that takes part in building prompts or drawing demonstrations, so
:func:`load_evaluate` loads the module with a stand-in for each of those packages that is *not*
installed here: any attribute of a stand-in is an inert placeholder (never a string or number), so
every string a test compares comes from OpenFlamingo's real code. The 2.0.1 wheel lacks
``eval/models/open_flamingo.py``; :class:`RecordingEvalModel` carries its two prompt methods
verbatim and records what ``evaluate_*`` asks it to decode.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

STAND_IN_ROOTS = ("einops", "einops_exts", "open_clip", "torchvision", "pycocoevalcap", "pycocotools", "sklearn",
                  "nltk", "inflection", "horovod")
SIBLINGS = ("utils", "coco_metric", "eval_datasets", "rices", "classification_utils", "eval_model",
            "ok_vqa_utils", "vqa_metric", "evaluate")


class _Placeholder:
    """What every name of a stand-in package is: attributes and calls give more placeholders, never
    a string or a number (so a compared value can never come from a stand-in)."""

    def __init__(self, name: str, *class_statement):  # (name, bases, namespace) when subclassed
        self._name = name

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        return _Placeholder(f"{self._name}()")

    def __repr__(self):
        return f"<stand-in {self._name}>"


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        return None


def load_evaluate(monkeypatch):
    """OpenFlamingo's ``evaluate`` module (stand-ins for the missing packages, undone by ``monkeypatch``)."""
    eval_dir = os.path.join(os.path.dirname(importlib.util.find_spec("open_flamingo").origin), "eval")
    missing = tuple(r for r in STAND_IN_ROOTS if importlib.util.find_spec(r) is None
                    or (r == "open_clip" and importlib.util.find_spec("torchvision") is None))
    finder = _Finder(missing)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.setattr(sys, "path", [eval_dir, *sys.path])
    clashing = [name for name in SIBLINGS if name in sys.modules]
    if clashing:
        raise RuntimeError(f"modules named like OpenFlamingo's eval scripts are already imported: {clashing}")
    before = set(sys.modules)
    evaluate = importlib.import_module("evaluate")
    ours = {*missing, *SIBLINGS, "open_flamingo"}
    for name in set(sys.modules) - before:  # registered with monkeypatch, so that undo removes them again
        if name.split(".")[0] in ours:  # (libraries it imported, torch.distributed.fsdp ..., stay: they are real)
            monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))
    return evaluate


class RecordingEvalModel:
    """OpenFlamingo's eval model as far as the prompts go; records each decoded batch."""

    def __init__(self):
        self.texts, self.images = [], []

    # Copied from open_flamingo/eval/models/open_flamingo.py (commit 36c176c): the reference strings.
    def get_vqa_prompt(self, question, answer=None) -> str:
        return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}{'<|endofchunk|>' if answer is not None else ''}"  # noqa: E501

    def get_caption_prompt(self, caption=None) -> str:
        return f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"  # noqa: E501

    def get_outputs(self, batch_text, batch_images, **kwargs):
        self.texts += list(batch_text)
        self.images += [list(row) for row in batch_images]
        return ["" for _ in batch_text]
