"""Load a checkpoint file of any supported format, detected by content, never executing it by default.

Formats: torch.save (zip or legacy pickle; plain state dicts, training dicts, Lightning .ckpt),
safetensors, TorchScript archives (.pt/.ptl), torch.export programs (.pt2) and NeMo .nemo tars.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import dataclasses
import difflib
import io
import json
import pickle
import pickletools
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.errors import PipelineError

ACCEPTED_FORMATS = (
    "torch.save files (.pt/.pth/.bin/.ckpt, zip or legacy), safetensors, TorchScript (.pt/.ptl), "
    "torch.export programs (.pt2), NeMo archives (.nemo)"
)
WEIGHT_KEYS = ("model_state_dict", "state_dict", "model", "module", "net")
CONFIG_KEYS = ("config", "hyper_parameters", "hparams")
EMA_KEYS = ("ema_state_dict", "state_dict_ema", "model_ema", "ema_model", "ema")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pt2", ".ptl", ".nemo")
NEMO_WEIGHTS, NEMO_CONFIG = "model_weights.ckpt", "model_config.yaml"
PT2_OLD_PICKLES = ("serialized_state_dict.json", "serialized_constants.json", "serialized_example_inputs.json")
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
PICKLE_FIX = (
    "if you trust this file, set model.allow_pickle=true (this unpickles the file and can execute "
    "arbitrary code from it); safer: re-save only the weights with torch.save(model.state_dict(), path) "
    "or safetensors"
)
REDOWNLOAD_FIX = "the file is truncated or corrupt (interrupted download or copy?): fetch or save it again"
TEXT_HINTS = {
    b"version https://git-lfs": "this is a Git LFS pointer, not the weights: run `git lfs pull` in its repository",
    b"<!doctype html": "this is an HTML page (a failed download?): download the file again",
    b"<html": "this is an HTML page (a failed download?): download the file again",
}


@dataclass
class LoadedCheckpoint:
    """Weights and metadata read from one checkpoint file."""

    kind: str
    state_dict: dict[str, torch.Tensor]
    config: dict | None = None
    ema_state_dict: dict[str, torch.Tensor] | None = None
    program: torch.export.ExportedProgram | None = None
    script: torch.jit.ScriptModule | None = None  # a TorchScript archive's module (its graph and code)
    notes: list[str] = field(default_factory=list)
    weights_path: str = ""  # where the weights sat in the file, dotted ("" = the file's own top level)
    # several nested tensor dicts could be the weights and no known key says which: path -> tensors,
    # for clean_state_dict to pick the one that fits the architecture (`state_dict` is the largest)
    candidates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def load_checkpoint_file(path: str | Path, *, allow_pickle: bool = False, weights_key: str | None = None
                         ) -> LoadedCheckpoint:
    """Detect the format of `path` by content and load it (weights-only unless `allow_pickle`).

    `weights_key` ("a.b") names the nested entry holding the weights, for layouts no rule knows.
    """
    path = _check_path(Path(path).expanduser())
    kind = _sniff(path)
    if weights_key and kind not in ("zip", "legacy", "tar"):
        raise PipelineError(f"model.weights_key={weights_key} is set, but {path} is a {kind} file: its tensors "
                            "are not nested under keys", fix="remove model.weights_key")
    loaders = {"zip": _load_zip, "legacy": _load_legacy, "safetensors": _load_safetensors, "tar": _load_nemo}
    loaded = loaders[kind](path, allow_pickle, weights_key)
    if weights_key and loaded.kind in ("torchscript", "exported_program"):
        raise PipelineError(f"model.weights_key={weights_key} is set, but {path} is a {loaded.kind} archive "
                            "with its own weights", fix="remove model.weights_key")
    return loaded


# ---------------------------------------------------------------- path and format detection


def _check_path(path: Path) -> Path:
    if path.is_dir():
        raise PipelineError(f"checkpoint {path} is a directory, not a file", fix=_directory_fix(path))
    if not path.exists():
        raise PipelineError(f"checkpoint file {path} does not exist", fix=_missing_fix(path))
    if path.stat().st_size == 0:
        raise PipelineError(f"checkpoint file {path} is empty (0 bytes)", fix=REDOWNLOAD_FIX)
    return path


def _directory_fix(path: Path) -> str:
    found = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)[:5]
    if found:
        return f"point model.checkpoint= at a file inside it, e.g. {path / found[0]} (found: {', '.join(found)})"
    return "point model.checkpoint= at a checkpoint file, not a directory"


def _missing_fix(path: Path) -> str:
    parent = path.parent
    if not parent.is_dir():
        return f"directory {parent} does not exist either: check model.checkpoint= (relative to {Path.cwd()})"
    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3)
    if close:
        return f"did you mean {' or '.join(str(parent / name) for name in close)}? set model.checkpoint= accordingly"
    return f"check model.checkpoint= (relative paths are resolved from {Path.cwd()})"


def _sniff(path: Path) -> str:
    """Name the container format from the first bytes of the file."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise PipelineError(
            f"cannot read checkpoint file {path}: {exc.strerror}", fix="check the file's permissions"
        ) from exc
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar":
        return "tar"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "legacy"
    raise PipelineError(
        f"checkpoint file {path} is not in a known format (first bytes: {head[:8]!r})",
        fix=f"{_format_hint(head)}accepted formats: {ACCEPTED_FORMATS}",
    )


def _format_hint(head: bytes) -> str:
    text = head.lstrip().lower()
    for prefix, hint in TEXT_HINTS.items():
        if text.startswith(prefix):
            return f"{hint}; "
    if head[4:6] == b"ET":
        return "this looks like an ExecuTorch program (.pte), an output of this pipeline, not a checkpoint; "
    return ""


# ---------------------------------------------------------------- zip archives


def _load_zip(path: Path, allow_pickle: bool, weights_key: str | None) -> LoadedCheckpoint:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PipelineError(
            f"checkpoint file {path} is a truncated or corrupt zip archive ({exc})", fix=REDOWNLOAD_FIX
        ) from exc
    if _is_torchscript(names):
        return _load_torchscript(path)
    if _is_exported_program(names):
        if not allow_pickle:
            _refuse_unsafe(path, _pt2_unsafe_globals(path))
        return _load_exported_program(path)
    if any(_inner(name) == "data.pkl" for name in names):
        return _torch_load_checkpoint(path, str(path), allow_pickle, weights_key, mmap=True)
    raise PipelineError(
        f"checkpoint file {path} is a zip archive but not a PyTorch checkpoint (members: {_short_list(names, 8)})",
        fix=f"accepted formats: {ACCEPTED_FORMATS}",
    )


def _inner(name: str) -> str:
    """Member name below the archive's root folder."""
    return name.split("/", 1)[1] if "/" in name else name


def _is_torchscript(names: list[str]) -> bool:
    inner = {_inner(n) for n in names}
    return {"data.pkl", "constants.pkl"} <= inner and any(n.startswith("code/") for n in inner)


def _is_exported_program(names: list[str]) -> bool:
    return any(_inner(n) == "archive_format" or n.endswith("serialized_exported_program.json") for n in names)


def _load_torchscript(path: Path) -> LoadedCheckpoint:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise PipelineError(f"cannot load TorchScript archive {path}: {_first_line(exc)}", fix=REDOWNLOAD_FIX) from exc
    state_dict = dict(module.state_dict())
    notes = [
        "TorchScript archive: deserialized with torch.jit.load (TorchScript code, not Python pickle)",
        f"weights: the scripted module's state_dict() ({len(state_dict)} tensors)",
    ]
    return LoadedCheckpoint("torchscript", state_dict, script=module, notes=notes)


def _load_exported_program(path: Path) -> LoadedCheckpoint:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise PipelineError(f"cannot load torch.export program {path}: {_first_line(exc)}", fix=REDOWNLOAD_FIX) from exc
    from ..upstream.torch_export import without_grad

    state_dict = dict(without_grad(program).state_dict)
    notes = [f"ExportedProgram (torch.export.load); weights: program.state_dict ({len(state_dict)} tensors)"]
    return LoadedCheckpoint("exported_program", state_dict, program=program, notes=notes)



def _pt2_unsafe_globals(path: Path) -> list[str]:
    """Classes that torch.export.load would unpickle from this archive, beyond the weights-only allowlist."""
    found: set[str] = set()
    try:
        with zipfile.ZipFile(path) as zf:
            for member in _pt2_pickled_members(zf):
                found |= _blob_globals(member, zf.read(member))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, AttributeError) as exc:
        raise PipelineError(f"torch.export archive {path} is corrupt ({exc})", fix=REDOWNLOAD_FIX) from exc
    return sorted(found - _allowed_globals())


def _pt2_pickled_members(zf: zipfile.ZipFile) -> list[str]:
    names = zf.namelist()
    members = [n for n in names if n.endswith(".pt") or n.rsplit("/", 1)[-1] in PT2_OLD_PICKLES]
    for config_name in (n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))):
        folder = config_name.rsplit("/", 1)[0]
        for meta in json.loads(zf.read(config_name)).get("config", {}).values():
            file = meta.get("path_name", "")
            if meta.get("use_pickle") or file.startswith(("custom_obj_", "opaque_obj_")):
                members.append(f"{folder}/{file}")
    return members


# ---------------------------------------------------------------- torch.load (zip or legacy pickle)


def _load_legacy(path: Path, allow_pickle: bool, weights_key: str | None) -> LoadedCheckpoint:
    return _torch_load_checkpoint(path, str(path), allow_pickle, weights_key, mmap=False)


def _torch_load_checkpoint(file: Path, source: str, allow_pickle: bool, weights_key: str | None, *,
                           mmap: bool) -> LoadedCheckpoint:
    obj = _torch_load(file, source, allow_pickle, mmap=mmap)
    return _from_object(obj, source, weights_key)


def _torch_load(file: Path, source: str, allow_pickle: bool, *, mmap: bool) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=not allow_pickle, mmap=mmap)
    except Exception as exc:  # unpickling user data can fail in many ways; each becomes a PipelineError
        if allow_pickle and isinstance(exc, (ImportError, AttributeError)):
            raise PipelineError(
                f"{source} references Python code that cannot be imported: {_first_line(exc)}",
                fix="make the package that defines these classes importable (PYTHONPATH), or re-save only the "
                "weights with torch.save(model.state_dict(), path)",
            ) from exc
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
            _refuse_unsafe(source, _unsafe_globals(file, str(exc)), _weights_unpickler_reason(str(exc)))
        raise PipelineError(
            f"cannot read {source} as a torch.save checkpoint: {_first_line(exc)}", fix=REDOWNLOAD_FIX
        ) from exc


def _refuse_unsafe(source: Path | str, classes: list[str], reason: str = "") -> None:
    if classes:
        raise PipelineError(
            f"{source} needs Python classes that weights-only loading refuses: {', '.join(classes)}", fix=PICKLE_FIX
        )
    if reason:
        raise PipelineError(f"{source} cannot be loaded weights-only: {reason}", fix=PICKLE_FIX)


def _weights_unpickler_reason(text: str) -> str:
    match = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    return match.group(1) if match else _first_line(text)


def _unsafe_globals(file: Path, error_text: str) -> list[str]:
    """Every pickled class the weights-only unpickler refuses: static scan, plus the one named in the error."""
    found = set(re.findall(r"GLOBAL (\S+) was not an allowed global", error_text))
    try:
        found |= _file_globals(file) - _allowed_globals()
    except Exception:  # the static scan is best effort; the error text already names one class
        pass
    return sorted(found)


def _file_globals(file: Path) -> set[str]:
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as zf:
            return _pickle_globals(io.BytesIO(zf.read(_data_pkl(zf))))
    found: set[str] = set()
    with file.open("rb") as f:  # legacy format: magic, protocol, sys info, the object, storage keys
        for _ in range(5):
            found |= _pickle_globals(f)
    return found


def _blob_globals(member: str, data: bytes) -> set[str]:
    """Globals in one pickled payload (a torch.save zip or a raw pickle); unreadable ones count as unsafe."""
    try:
        if data[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                data = zf.read(_data_pkl(zf))
        return _pickle_globals(io.BytesIO(data)) if data else set()
    except Exception:
        return {f"<unreadable pickle in {member}>"}


def _data_pkl(zf: zipfile.ZipFile) -> str:
    return next(n for n in zf.namelist() if _inner(n) == "data.pkl")


def _pickle_globals(stream: io.BufferedIOBase) -> set[str]:
    """Names of GLOBAL / STACK_GLOBAL references in one pickle, read without executing it."""
    found: set[str] = set()
    pushed: deque[str | None] = deque([None, None], maxlen=2)  # the last two pushed values, if strings
    memo: dict[int, str | None] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "STACK_GLOBAL"):
            module_and_name = arg.split(" ", 1) if name == "GLOBAL" else list(pushed)
            if None not in module_and_name:
                found.add(_global_name(*module_and_name))
            pushed.append(None)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        else:
            pushed.append(arg if isinstance(arg, str) and ("UNICODE" in name or "STRING" in name) else None)
    return found


def _global_name(module: str, name: str) -> str:
    """`module.name` as Python 3 resolves it (protocol-2 pickles say `__builtin__.set` for `builtins.set`)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as unpickler

    return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())


# ---------------------------------------------------------------- classify a loaded object


def _from_object(obj: Any, source: str, weights_key: str | None) -> LoadedCheckpoint:
    if weights_key:
        return _training_dict(obj, source, _at_path(obj, weights_key, source), weights_key, "model.weights_key")
    if isinstance(obj, torch.nn.Module):
        notes = [f"pickled {type(obj).__name__} module: used its state_dict()"]
        return LoadedCheckpoint("state_dict", dict(obj.state_dict()), notes=notes)
    if isinstance(obj, torch.Tensor):
        raise PipelineError(
            f"{source} holds a single tensor of shape {tuple(obj.shape)}, not named weights",
            fix="save the weights with torch.save(model.state_dict(), path)",
        )
    if not isinstance(obj, Mapping):
        raise PipelineError(
            f"{source} holds a {type(obj).__name__}, not a state dict, training dict or module",
            fix="save the weights with torch.save(model.state_dict(), path)",
        )
    return _from_dict(obj, source)


def _from_dict(ckpt: Mapping, source: str) -> LoadedCheckpoint:
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state_dict = _tensor_dict(ckpt, source, "the file")
        return LoadedCheckpoint("state_dict", state_dict, notes=[f"plain state dict ({len(state_dict)} tensors)"])
    weights_key = next((k for k in WEIGHT_KEYS if k in ckpt), None)
    if weights_key is not None:
        return _training_dict(ckpt, source, ckpt[weights_key], weights_key, f"the known key '{weights_key}'")
    found = _tensor_mappings(ckpt)
    if not found:
        _no_weights(ckpt, source, [str(k) for k in ckpt])
    if len(found) == 1:
        (path, weights), = found.items()
        return _training_dict(ckpt, source, weights, path, "the only dict of tensors in the file")
    largest = max(found, key=lambda path: len(found[path]))
    loaded = _training_dict(ckpt, source, found[largest], largest, "")
    loaded.candidates = found
    loaded.notes.append("candidates for the weights: " + _short_list([f"{p} ({len(t)} tensors)" for p, t in found.items()]))
    return loaded


def _training_dict(ckpt: Any, source: str, weights: Any, path: str, chosen_by: str) -> LoadedCheckpoint:
    """The weights found at `path` in a training dict, with its config and EMA weights beside them."""
    state_dict = _tensor_dict(weights, source, f"'{path}'")
    notes = [f"weights: '{path}' ({len(state_dict)} tensors)" + (f", chosen by {chosen_by}" if chosen_by else "")]
    if not isinstance(ckpt, Mapping):
        return LoadedCheckpoint("training_dict", state_dict, notes=notes, weights_path=path)
    keys = [str(k) for k in ckpt]
    notes.insert(0, f"top-level keys: {_short_list(keys)}")
    lightning = path == "state_dict" and ("pytorch-lightning_version" in ckpt or "hyper_parameters" in ckpt)
    config, config_key = _config_from(ckpt, notes)
    ema, ema_path = _find_ema(ckpt, source)
    if ema is not None:
        notes.append(f"EMA weights: {' -> '.join(ema_path)} ({len(ema)} tensors)")
    used = {path.split(".", 1)[0], config_key, ema_path[0] if ema_path else None}
    ignored = [k for k in keys if k not in used]
    if ignored:
        notes.append(f"ignored: {_short_list(ignored)}")
    kind = "lightning" if lightning else "training_dict"
    return LoadedCheckpoint(kind, state_dict, config=config, ema_state_dict=ema, notes=notes, weights_path=path)


def _at_path(obj: Any, dotted: str, source: str) -> Any:
    """The entry at `a.b.c` in nested dicts (or modules' state dicts), or an error naming the keys there."""
    value, walked = obj, []
    for key in dotted.split("."):
        if isinstance(value, torch.nn.Module):
            value = value.state_dict()
        keys = {str(k): k for k in value} if isinstance(value, Mapping) else {}
        if key not in keys:
            here = f"'{'.'.join(walked)}'" if walked else "the file's top level"
            have = _short_list(list(keys)) if keys else f"none: it is a {type(value).__name__}"
            raise PipelineError(f"model.weights_key={dotted}: {source} has no key '{key}' at {here} (keys: {have})",
                                fix=f"set model.weights_key= to a path of keys that exists{_paths_hint(obj)}")
        value, walked = value[keys[key]], walked + [key]
    return value


def _tensor_mappings(value: Any, path: tuple[str, ...] = (), depth: int = 4) -> dict[str, dict]:
    """Every nested name -> tensor dict below the top level, by dotted path. Mappings keyed by
    integers (an optimizer's per-parameter state) are not searched: they hold no named weights."""
    if isinstance(value, torch.nn.Module):
        value = value.state_dict()
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) for k in value):
        return {}
    if all(isinstance(v, torch.Tensor) for v in value.values()):
        return {".".join(path): dict(value)} if path else {}
    if depth == 0:
        return {}
    found: dict[str, dict] = {}
    for key, item in value.items():
        found.update(_tensor_mappings(item, (*path, key), depth - 1))
    return found


def _paths_hint(obj: Any) -> str:
    found = _tensor_mappings(obj) if isinstance(obj, Mapping) else {}
    return f"; dicts of tensors in the file: {_short_list([f'{p} ({len(t)})' for p, t in found.items()])}" if found else ""


def _no_weights(ckpt: Mapping, source: str, keys: list[str]) -> None:
    if any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        _tensor_dict(ckpt, source, "the file")  # raises: names the non-tensor entries
    raise PipelineError(
        f"{source} has no recognizable weights (top-level keys: {_short_list(keys) or 'none'})",
        fix="name the entry holding the weights with model.weights_key=a.b, or save a state dict "
        f"(or a dict with the weights under one of: {', '.join(WEIGHT_KEYS)})",
    )


def _tensor_dict(value: Any, source: str, where: str) -> dict[str, torch.Tensor]:
    """`value` as a non-empty name -> tensor dict, or a PipelineError saying what is wrong with it."""
    if isinstance(value, torch.nn.Module):
        value = value.state_dict()
    if not isinstance(value, Mapping) or not value:
        what = "an empty dict" if isinstance(value, Mapping) else f"a {type(value).__name__}"
        raise PipelineError(
            f"{source}: {where} holds {what}, expected a dict of tensors",
            fix="save the weights with torch.save(model.state_dict(), path)",
        )
    bad = [f"{k} ({type(v).__name__})" for k, v in value.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PipelineError(
            f"{source}: {where} holds non-tensor values where tensors are expected: {_short_list(bad)}",
            fix="save only tensors (model.state_dict()); keep other values under separate top-level keys",
        )
    return {str(k): v for k, v in value.items()}


def _config_from(ckpt: Mapping, notes: list[str]) -> tuple[dict | None, str | None]:
    key = next((k for k in CONFIG_KEYS if k in ckpt), None)
    if key is None:
        return None, None
    config = _plain(ckpt[key])
    if not isinstance(config, dict):
        notes.append(f"config: '{key}' holds a {type(config).__name__}, not a mapping; ignored")
        return None, key
    notes.append(f"config: '{key}'")
    return config, key


def _find_ema(ckpt: Mapping, source: str) -> tuple[dict[str, torch.Tensor] | None, tuple[str, ...]]:
    """EMA weights stored next to the weights or in a Lightning callback's state, with where they were."""
    for key in EMA_KEYS:
        if key in ckpt:
            return _tensor_dict(_unwrap_ema(ckpt[key]), source, f"'{key}'"), (key,)
    callbacks = ckpt.get("callbacks")
    if isinstance(callbacks, Mapping):
        for name, state in callbacks.items():
            if "ema" in str(name).lower():
                return _tensor_dict(_unwrap_ema(state), source, f"callback '{name}'"), ("callbacks", str(name))
    return None, ()


def _unwrap_ema(value: Any) -> Any:
    """The tensor dict inside an EMA container ({'state_dict': ...}, {'module': ...}, ...), else `value`."""
    if isinstance(value, Mapping) and not all(isinstance(v, torch.Tensor) for v in value.values()):
        for key in EMA_KEYS + WEIGHT_KEYS + ("shadow",):
            if isinstance(value.get(key), (Mapping, torch.nn.Module)):
                return value[key]
    return value


def _plain(value: Any) -> Any:
    """Config objects (OmegaConf, dataclasses, namespaces, tensors) as plain python containers."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException:
            return OmegaConf.to_container(value, resolve=False)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, argparse.Namespace):
        return _plain(vars(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return repr(value)


# ---------------------------------------------------------------- safetensors


def _load_safetensors(path: Path, allow_pickle: bool, weights_key: str | None) -> LoadedCheckpoint:
    header = _safetensors_header(path)
    try:
        state_dict = safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"cannot read safetensors file {path}: {_first_line(exc)}", fix=REDOWNLOAD_FIX) from exc
    if not state_dict:
        raise PipelineError(f"safetensors file {path} holds no tensors", fix="save the model's weights into it")
    notes = [f"safetensors ({len(state_dict)} tensors)"]
    metadata = header.get("__metadata__") or {}
    config = None
    key = next((k for k in CONFIG_KEYS if k in metadata), None)
    if key is not None:
        try:
            config = json.loads(metadata[key])
        except (TypeError, json.JSONDecodeError):
            notes.append(f"metadata '{key}' is not valid JSON; ignored")
        else:
            notes.append(f"config: metadata '{key}'")
    others = sorted(k for k in metadata if k != key)
    if others:
        notes.append(f"other metadata: {_short_list(others)}")
    return LoadedCheckpoint("safetensors", state_dict, config=config if isinstance(config, dict) else None, notes=notes)


def _safetensors_header(path: Path) -> dict:
    """The JSON header, after checking that the file holds every byte the header promises."""
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        raw = f.read(length)
    if 8 + length > size:
        raise PipelineError(
            f"safetensors file {path} is truncated: its header needs {8 + length} bytes, the file has {size}",
            fix=REDOWNLOAD_FIX,
        )
    try:
        header = json.loads(raw)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise PipelineError(f"safetensors file {path} has a corrupt header ({exc})", fix=REDOWNLOAD_FIX) from exc
    if 8 + length + end > size:
        raise PipelineError(
            f"safetensors file {path} is truncated: it should be {8 + length + end} bytes, it has {size}",
            fix=REDOWNLOAD_FIX,
        )
    return header


# ---------------------------------------------------------------- NeMo .nemo (tar)


def _load_nemo(path: Path, allow_pickle: bool, weights_key: str | None) -> LoadedCheckpoint:
    """Read model_weights.ckpt and model_config.yaml only; members are copied to files named by us."""
    with tempfile.TemporaryDirectory(prefix="nemo_") as tmp:
        weights_file = Path(tmp) / NEMO_WEIGHTS
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
                weights = _nemo_member(path, members, NEMO_WEIGHTS)
                with tar.extractfile(weights) as src, weights_file.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                config_member = members.get(NEMO_CONFIG)
                has_config = config_member is not None and config_member.isfile()
                config_text = tar.extractfile(config_member).read() if has_config else None
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise PipelineError(
                f"checkpoint file {path} is a truncated or corrupt tar archive ({exc})", fix=REDOWNLOAD_FIX
            ) from exc
        loaded = _torch_load_checkpoint(weights_file, f"{path} (member {NEMO_WEIGHTS})", allow_pickle, weights_key,
                                        mmap=False)
    loaded.kind = "nemo"
    loaded.notes.insert(0, f"NeMo archive: weights from {NEMO_WEIGHTS}")
    if config_text is None:
        loaded.notes.append(f"no {NEMO_CONFIG} in the archive")
    else:
        loaded.config = _nemo_config(path, config_text)
        loaded.notes.append(f"config: {NEMO_CONFIG}")
    return loaded


def _nemo_member(path: Path, members: dict[str, tarfile.TarInfo], name: str) -> tarfile.TarInfo:
    member = members.get(name)
    if member is None or not member.isfile():
        raise PipelineError(
            f"archive {path} has no regular file {name} at its root (members: {_short_list(list(members))})",
            fix=f"a NeMo .nemo archive must hold {NEMO_WEIGHTS} and {NEMO_CONFIG}; re-save it with model.save_to()",
        )
    return member


def _nemo_config(path: Path, text: bytes) -> dict:
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{NEMO_CONFIG} in {path} is not valid YAML ({exc})", fix=REDOWNLOAD_FIX) from exc
    if not isinstance(config, dict):
        raise PipelineError(f"{NEMO_CONFIG} in {path} is not a mapping", fix=REDOWNLOAD_FIX)
    return config


# ---------------------------------------------------------------- helpers


def _short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown}, ... and {len(items) - limit} more" if len(items) > limit else shown


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
