"""Imported by the fork server of pipelines/isolation.py only (last in its preload list).

Builds once what every child would build again (XNNPACK's pattern graphs, when the server has
ExecuTorch), and when its job process ends, leaves without tearing down what it preloaded
(torch, ExecuTorch, onnxruntime: 1.4 s of CPU per server, which the next sweep would wait for)."""
import atexit
import os
import sys

if "executorch.exir" in sys.modules:
    from stages.upstream.executorch import build_pattern_graphs

    build_pattern_graphs()

atexit.register(os._exit, 0)
