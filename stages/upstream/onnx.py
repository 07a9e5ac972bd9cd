"""onnx 1.23.2: what its loader needs from us."""
from __future__ import annotations

from pathlib import Path


def load_graph(path: Path):
    """The ModelProto at path with its external data read in, as `onnx.load(path)` would.

    onnx 1.23's loader refuses an external data file with more than one hard link
    (`_open_external_data` in onnx/checker.cc, "has multiple hard links, indicating a potential
    hardlink attack", GHSA-538c-55jv-c5g9), and the stage cache hard-links the files an entry
    passes on (an fp32 graph's weights, an artifact linked into a run). The data is read here
    with the loader's other guards: only a plain file name beside the model (no directory, no
    `..`), offset and length within the file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location or Path(location).name != location or location in (".", ".."):
            raise ValueError(f"{path}: tensor {tensor.name} names external data {location!r} outside its folder")
        data = Path(path).parent / location
        offset, size = int(info.get("offset", 0)), data.stat().st_size
        length = int(info.get("length", size - offset))
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"{path}: tensor {tensor.name} reads past the end of {location}")
        with open(data, "rb") as handle:  # one tensor at a time: the weights are held once
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return model


def _tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)
