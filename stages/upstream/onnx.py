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
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.raw_data = external_bytes(path, tensor)  # one tensor at a time: held once
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def external_bytes(path: Path, tensor) -> bytes:
    """The bytes of one tensor that the graph at path keeps in an external data file, read with
    onnx's guards except the hard-link one (see load_graph)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location or Path(location).name != location or location in (".", ".."):
        raise ValueError(f"{path}: tensor {tensor.name} names external data {location!r} outside its folder")
    data = Path(path).parent / location
    offset, size = int(info.get("offset", 0)), data.stat().st_size
    length = int(info.get("length", size - offset))
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"{path}: tensor {tensor.name} reads past the end of {location}")
    with open(data, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def external_tensors(model) -> list:
    """The tensors of a graph loaded without its external data whose bytes are in that file."""
    import onnx

    return [t for t in all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)
