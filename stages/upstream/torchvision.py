"""torchvision 0.28.0 (PyPI) beside the CPU torch 2.13.0: `import torchvision` raises.

PyPI's wheel is a CUDA build: its _C.so needs libc10_cuda.so, which the CPU torch lacks, so
torchvision/extension.py's `_load_library` fails quietly and its C++ operators are absent. Then
torchvision/_meta_registrations.py:163 and :177 register fake kernels for torchvision::nms and
::qnms without asking whether the operators exist (unguarded, unlike the `register_meta` ones
above them), and the import raises "operator torchvision::nms does not exist". transformers 5.23
imports torchvision whenever it is installed (image_utils.py:59, reached from every model's
module through loss/loss_utils.py), so every transformers model fails to build beside it too.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_KEEP: list = []  # the schema library lives as long as the process
_prepared = False  # once per process: an availability check (find_spec) may come long before the import


def importable() -> None:
    """Make `import torchvision` work in this process, at no cost until something imports it:
    a finder placed first on sys.meta_path that, when torchvision is first imported, tries its
    _C.so as torchvision would (torch.ops.load_library) and, where that fails, defines the two
    schemas its fake kernels need before the import goes on. Models are pure Python and need none
    of its C++ operators (an exported part stops before non-maximum suppression)."""
    if _prepared or "torchvision" in sys.modules or any(isinstance(f, _Prepare) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Prepare())


class _Prepare(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once; the import itself goes on through the usual finders
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.origin:
            _prepare(Path(spec.origin).parent)
        return None


def _prepare(package: Path) -> None:
    global _prepared
    import torch

    _prepared = True
    try:
        torch.ops.load_library(str(next(package.glob("_C*.so"))))  # what torchvision/extension.py does
    except (StopIteration, OSError):  # the CUDA build beside the CPU torch: libc10_cuda.so is missing
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(library)
