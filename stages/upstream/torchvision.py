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

import importlib.util
import sys

_KEEP: list = []  # the schema library lives as long as the process


def importable() -> None:
    """Import torchvision where it is installed; where its operators failed to load, define the
    two schemas its fake kernels need first and import it again. Models are pure Python and need
    none of its C++ operators (an exported part stops before non-maximum suppression)."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
        import torch

        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(library)
        import torchvision  # noqa: F401,F811
