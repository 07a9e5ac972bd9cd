"""Imported by the fork server of pipelines/isolation.py only (last in its preload list): when
its job process ends, the server leaves without tearing down what it preloaded (torch,
ExecuTorch, onnxruntime: 1.4 s of CPU per server, which the next sweep would wait for)."""
import atexit
import os

atexit.register(os._exit, 0)
