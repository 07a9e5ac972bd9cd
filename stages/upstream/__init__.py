"""Workarounds for bugs in the pinned libraries, one module per library, each in one place.

Every workaround names the upstream version it answers, the library line that causes it, and a
test in tests/test_upstream.py that reproduces the upstream failure from a few-layer module
without it: when a pin moves and that test starts failing, the workaround can go.

    onnxruntime.py  quantize_static crash on multi-dim LayerNorm scales; u8*s8 saturation on x86;
                    NchwcTransformer segfault on fp16 graphs; QLinearAveragePool with ceil_mode
    onnxscript.py   torchlib's operator list re-parsed from the functions' sources on every
                    torch.onnx export (0.4 s each): built once a process
    executorch.py   integer scalars made float by XNNPACKQuantizer; fp16 LayerNorm kernel;
                    dynamic batch narrowed by the CPU convolution backend choice while lowering;
                    dynamic batch pinned by the edge IR validator on list-returning ops;
                    the delegate's copy of every weight held in memory until the .pte is written;
                    XNNPACK's pattern graphs (lowering's SDPA and bilinear, the quantizer's
                    conv + batch norm) built, seconds a process, for graphs that cannot match them
    torchvision.py  PyPI's CUDA torchvision beside the CPU torch fails to import (and so every
                    transformers model)
    torch_export.py TS2EPConverter lifts TorchScript's parameters as buffers that require grad: a
                    saved program reloads them as non-leaf views (no deepcopy: lowering fails)
                    that INT8 does not quantize as weights
    transformers.py its static-cache export wrapper leaves the KV cache as constants (no state,
                    and decomposing the program fails): a causal LM decode step whose cache is
                    the program's buffers
"""
