"""Config schema: every Hydra group is typed, so typos and bad values fail at compose time.

Closed choices are enums (OmegaConf names the allowed values when one is wrong); free-form
nodes (a model's `arch` with `_target_`, dataset callables) are plain dicts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Format(str, Enum):
    onnx = "onnx"
    pte = "pte"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    int64 = "int64"
    int32 = "int32"
    bool = "bool"
    uint8 = "uint8"  # raw inputs: image bytes
    string = "string"  # raw inputs: text


class PreprocessMode(str, Enum):
    none = "none"  # the artifact takes the tensors the model was trained on
    raw = "raw"  # it takes what the app has (the part's raw inputs), its processing inside


class CalibrationSource(str, Enum):
    synthetic = "synthetic"
    files = "files"
    dataset = "dataset"


class ProfileWhen(str, Enum):
    slower = "slower"
    always = "always"
    never = "never"


class CalibrationTransform(str, Enum):
    steps = "steps"  # the part's raw.preprocess steps, as the artifact runs them (onnxruntime)
    reference = "reference"  # the part's raw.reference (the app's Python)


class CalibrateMethod(str, Enum):
    MinMax = "MinMax"
    Entropy = "Entropy"
    Percentile = "Percentile"


class OnFailure(str, Enum):
    error = "error"  # the cell fails
    fp32 = "fp32"  # rebuild the whole cell at fp32
    mixed = "mixed"  # keep the layers that break at higher precision, then fp32 as the last resort


class Isa(str, Enum):
    """The instruction sets an artifact's runtime executes on."""

    x86_64 = "x86_64"
    arm64 = "arm64"
    wasm32 = "wasm32"  # onnxruntime-web's WebAssembly build, in a browser


class StateMode(str, Enum):
    auto = "auto"  # io for formats without mutable state (onnx), internal for the others (pte)
    io = "io"  # state as explicit inputs state_in_* and outputs state_out_*
    internal = "internal"  # mutable buffers kept inside the program


class Diagnose(str, Enum):
    never = "never"
    on_failure = "on_failure"  # name the layers when a cell breaches its tolerance
    always = "always"  # per-layer errors in every verify.json


class StreamSignal(str, Enum):
    sine = "sine"
    noise = "noise"
    file = "file"


@dataclass
class LengthOf:
    """Names the input dim an integer input measures: synthetic values are then valid lengths,
    in [max(low, 1), that dim's size], e.g. `{input: feats, dim: 2}` for lengths <= T."""

    input: str = MISSING
    dim: int = MISSING


@dataclass
class TensorSpec:
    """One exported input: name, example shape, dtype, dynamic dims and value range."""

    name: str = MISSING
    shape: List[int] = MISSING
    dtype: DType = DType.float32
    dynamic: Dict[int, str] = field(default_factory=dict)  # dim index -> dim name, e.g. {0: batch}
    kwarg: Optional[str] = None  # the module's keyword argument this input feeds
    low: float = -1.0  # synthetic values are drawn in [low, high), integers too (high = vocab size)
    high: float = 1.0
    max: int = 1024  # upper bound of its dynamic dims (ExecuTorch plans memory for it)
    length_of: Optional[LengthOf] = None  # an integer input holding another input's valid length


@dataclass
class RawConfig:
    """What an app really has for a part (image bytes, a waveform, a sentence) and the steps from
    it to the part's inputs (and from its first output to what the app shows); see
    stages/processing/. Used when preprocess=raw."""

    inputs: List[TensorSpec] = MISSING  # uint8 bytes {dynamic: {0: bytes}}, a float waveform, a string
    preprocess: List[Dict[str, Any]] = field(default_factory=list)  # [{step: decode_image, ...}, ...]
    postprocess: List[Dict[str, Any]] = field(default_factory=list)  # on the part's first output
    # the app's own Python preprocessing, the reference: fn(one raw example) -> {part input: array}
    reference: Dict[str, Any] = MISSING
    # held-out raw examples: fn() -> {"inputs": {raw input: list or array of examples}, "labels": ...}
    eval_data: Dict[str, Any] = MISSING


@dataclass
class ToleranceOverride:
    """A part's own bounds at one precision; a field left unset keeps the precision's value,
    null switches that check off."""

    max_abs: Optional[float] = MISSING
    max_rel: Optional[float] = MISSING
    mean_abs: Optional[float] = MISSING
    min_cosine: Optional[float] = MISSING
    max_accuracy_drop: Optional[float] = MISSING
    min_top1_agreement: Optional[float] = MISSING
    min_map_iou: Optional[float] = MISSING
    min_box_iou: Optional[float] = MISSING


PRECISIONS = sorted(path.stem for path in (Path(__file__).parents[1] / "conf" / "precision").glob("*.yaml"))

# A part's tolerance overrides, by precision (`tolerance: {fp16: {max_abs: 0.05}}`): one field per
# precision conf/precision/ ships, so a misspelt one is refused at compose time; each present and
# unset, so `model.parts.0.tolerance.int4.max_abs=0.1` on the command line sets one field (under a
# None node OmegaConf's update asserts: a traceback, not an error). Its module named, as Python
# 3.11's make_dataclass does not: a sweep job's config goes back to the sweep's process pickled.
PartTolerance = make_dataclass("PartTolerance", [(name, ToleranceOverride, field(default_factory=ToleranceOverride))
                                                 for name in PRECISIONS], namespace={"__module__": __name__})


@dataclass
class GenerateConfig:
    """A decoder step verified by what it generates (stages/support/generation.py): prompts fed a
    token a call, then its greedy choice fed back, its state carried; eager's tokens vs the
    artifact's."""

    token: str = MISSING  # the input that takes one token id a call
    logits: str = MISSING  # the output whose argmax (last axis) is the next token
    position: Optional[str] = None  # an input that takes the call's position (a cache position)
    # the token (and position) input's dynamic axis takes the whole prompt in one call, which
    # fills the cache (prefill); then a token a call. Else every call takes one token
    prefill: bool = False
    steps: int = 24  # tokens generated after each prompt
    prompts: int = 4  # held-out prompts: seeded token ids in the token input's [low, high)
    prompt_length: int = 4
    seed: int = 0
    prompt_data: Optional[Dict[str, Any]] = None  # {_target_: fn} -> prompts (lists of token ids), instead


@dataclass
class PartConfig:
    """One exported component of a model (an encoder, a step decoder)."""

    name: str = MISSING
    module: str = ""  # dotted path of the sub-module to export; "" = the whole model
    method: str = "forward"  # the method to export
    inputs: List[TensorSpec] = MISSING
    outputs: List[str] = MISSING
    # outputs that are scores over classes: verify judges their top-1 agreement with eager (per
    # position for dense maps), labels or not. A list of names, or {name: {axis: 1}} naming the
    # class axis (default: the last up to rank 3, axis 1 for (N, C, H, W) maps); null = the
    # outputs named like logits/scores/probs
    scores: Optional[Any] = None
    # detectors: the app's decode step, judged by box IoU with eager's:
    # {decode: {_target_: fn(outputs={name: array}, ...) -> {boxes: (N, K, 4), scores: (N, K)}}, top: 50}
    boxes: Optional[Dict[str, Any]] = None
    generate: Optional[GenerateConfig] = None  # a decoder step: verified by greedy generation
    eval_data: Optional[Dict[str, Any]] = None  # {_target_: fn} -> held-out inputs (and labels)
    calibration_data: Optional[Dict[str, Any]] = None  # {_target_: fn} -> training-split inputs
    state: Dict[str, str] = field(default_factory=dict)  # state input -> output, e.g. {h0: h1}
    raw: Optional[RawConfig] = None  # raw inputs and processing steps, for preprocess=raw
    tolerance: PartTolerance = field(default_factory=PartTolerance)  # over the precision's own


@dataclass
class CleanConfig:
    strip_prefixes: Optional[List[str]] = None  # None = automatic when keys do not match
    select: Optional[str] = None
    rename: Dict[str, str] = field(default_factory=dict)
    drop: List[str] = field(default_factory=list)
    prefer_ema: bool = False
    strict: bool = True


@dataclass
class ModelConfig:
    name: str = MISSING
    arch: Optional[Dict[str, Any]] = None  # {_target_: pkg.Class, **kwargs}
    factory: Optional[str] = None  # dotted callable building the model from the checkpoint's config
    checkpoint: str = MISSING
    # writes a missing checkpoint: a dotted callable(path), or {_target_: callable, **its args}
    make_checkpoint: Optional[Any] = None
    allow_pickle: bool = False
    # dotted path of the weights inside a training dict (`run.model_state`), for layouts the known
    # keys miss; null = found by content (the nested dict of tensors that fits the architecture)
    weights_key: Optional[str] = None
    clean: CleanConfig = field(default_factory=CleanConfig)
    parts: List[PartConfig] = MISSING
    # model=graph (a .pt2/TorchScript file, no class): its input shapes, [[1, 1, 750]] or specs
    # [{shape: [...], dtype: int64, dynamic: {0: batch}}]; null = as the file records them (.pt2)
    inputs: Optional[List[Any]] = None


@dataclass
class Tolerance:
    max_abs: Optional[float] = 1e-4
    # the largest error as a fraction of the output's largest eager magnitude (scale-free: what
    # an fp16 device's own arithmetic is judged by)
    max_rel: Optional[float] = None
    mean_abs: Optional[float] = None
    min_cosine: Optional[float] = 0.999
    max_accuracy_drop: Optional[float] = None  # percentage points, for models with labels
    min_top1_agreement: Optional[float] = None  # fraction of held-out samples (positions, for maps)
    min_map_iou: Optional[float] = None  # dense score maps: mean IoU of the argmax masks with eager's
    min_box_iou: Optional[float] = None  # parts with `boxes`: mean IoU of the decoded boxes with eager's


@dataclass
class StoredWeights:
    """What the size audit holds an artifact of a precision to: proof the precision happened."""

    dtypes: List[str] = field(default_factory=list)  # the weights must be mostly these; [] = no check
    quantized: bool = False  # quantization ops in the graph (embedding tables left float exempt)
    max_bytes_per_parameter: Optional[float] = None  # the shipped file's bound (fp32 is 4)
    # over the bound: the audit fails (true), or warns (the compute is still the precision's)
    oversize_fails: bool = True


@dataclass
class PrecisionConfig:
    # a precision each format registers a scheme for (stages/formats/<format>_precisions.py):
    # a name no format builds is refused before any stage runs
    name: str = MISSING
    tolerance: Tolerance = field(default_factory=Tolerance)
    options: Dict[str, Any] = field(default_factory=dict)  # the scheme's own (int4: group_size)
    weights: StoredWeights = field(default_factory=StoredWeights)


# each format its own schema (conf/format/<name>.yaml names it in its defaults): a key of the
# other format (`format=pte format.opset=11`) is refused at compose time, not silently keyed
@dataclass
class OnnxFormat:
    name: Format = Format.onnx
    opset: int = 18
    dynamic_dims: bool = True  # the specs' dynamic dims (batch...) stay dynamic axes
    optimize: bool = True  # ORT offline graph optimisation of the shipped file
    external_data_threshold_mb: int = 1900  # above this the weights go to a side .data file


@dataclass
class PteFormat:
    name: Format = Format.pte
    xnnpack: bool = True  # delegate to XNNPACK


FORMAT_SCHEMAS = {Format.onnx: OnnxFormat, Format.pte: PteFormat}


class DeviceRuntime(str, Enum):
    cpu = "cpu"  # the format's own runtime (onnxruntime, ExecuTorch) on this CPU: natively on a host
    #              that is one, else under qemu-user emulation (devices/install.py)
    browser = "browser"  # onnxruntime-web's wasm in headless Chromium (.onnx only; web/install.sh)


@dataclass
class DeviceConfig:
    """One device a target ships to: verify_target runs the artifact there and judges it."""

    name: str = MISSING  # a column of the report: cortex-a76, x86-64-avx2, chromium-wasm
    isa: Isa = MISSING
    runtime: DeviceRuntime = DeviceRuntime.cpu
    # the qemu CPU model that emulates it; null: it runs only on a host that is one
    cpu: Optional[str] = None
    # CPU features (pipelines/versions.py CPU_FEATURES: vnni, avx2, avx512, fp16...) it has (true)
    # or lacks (false): a host whose own agree, on the same isa, runs it natively
    features: Dict[str, bool] = field(default_factory=dict)
    note: str = ""  # what it stands for (a phone's big core, a server without VNNI)


@dataclass
class TargetConfig:
    """Where the artifact will run: it decides how INT8 is built, not the build machine's CPU."""

    name: str = MISSING  # server | web | android
    isa: List[Isa] = MISSING  # every CPU family the artifact may meet
    # the devices verify_target checks the artifact on, each in its own runtime; the cell passes
    # only when every one does
    devices: List[DeviceConfig] = field(default_factory=list)
    # whether its onnxruntime has onnxruntime-extensions' custom ops (image decoding, tokenizers):
    # processing steps that need them stay in the app where it has not
    onnx_custom_ops: bool = True


@dataclass
class PreprocessConfig:
    mode: PreprocessMode = PreprocessMode.none


@dataclass
class QuantizeConfig:
    on_failure: OnFailure = OnFailure.error
    calibrate_method: CalibrateMethod = CalibrateMethod.MinMax
    per_channel: bool = True
    keep_float: List[str] = field(default_factory=list)  # module paths left at fp32 (e.g. head)
    max_float_layers: int = 8  # on_failure=mixed: layers it may keep float before falling back
    # a cell that fell back is judged by conf/precision/fp32.yaml's tolerance, what a precision=fp32
    # cell has, with the fields set here (`quantize.fallback_tolerance.max_rel=1e-3`)
    fallback_tolerance: ToleranceOverride = field(default_factory=ToleranceOverride)


@dataclass
class CalibrationConfig:
    source: CalibrationSource = CalibrationSource.dataset
    samples: int = 128
    batch_size: int = 16
    seed: int = 0
    # source=files: .npz/.npy arrays of the inputs, or images / .wav recordings (or folders of them)
    # taken through the part's raw preprocessing
    files: List[str] = field(default_factory=list)
    transform: CalibrationTransform = CalibrationTransform.steps  # of images/recordings: steps | reference


@dataclass
class StreamConfig:
    """The deterministic signal a stateful part is verified on, chunk by chunk; unused otherwise.

    Float inputs get the signal along their last axis, continuing across chunks; integer inputs
    get seeded values in the spec's [low, high).
    """

    chunks: int = 24
    signal: StreamSignal = StreamSignal.sine
    frequency_hz: float = 261.63  # sine: C4
    sample_rate: int = 16000
    amplitude: float = 0.5
    seed: int = 0  # noise, integer inputs
    file: Optional[str] = None  # signal=file: a 1-D .npy signal, read in consecutive pieces


@dataclass
class VerifyConfig:
    samples: int = 64  # held-out inputs when the model has no eval_data
    batch_size: int = 16
    seed: int = 1234  # differs from calibration's seed: verification never sees calibration inputs
    diagnose: Diagnose = Diagnose.on_failure  # per-layer errors vs eager (stages/support/diagnose.py)
    stream: StreamConfig = field(default_factory=StreamConfig)  # parts with state
    # devices of the target this host is not are run under qemu-user (devices/install.py);
    # false: they are SKIPPED, by name, and the cell's verdict says so (a quick local iteration)
    emulate: bool = True


@dataclass
class BenchmarkConfig:
    """Latency at batch 1 in the artifact's runtime, and of eager PyTorch FP32 as the reference:
    `warmup` calls, then calls until both `min_runs` and `min_seconds` are reached (at most
    `max_runs`), on `threads` threads in every runtime."""

    enabled: bool = True
    threads: int = 1
    warmup: int = 5
    min_runs: int = 20
    max_runs: int = 500
    min_seconds: float = 1.0
    # a per-operator profile in the artifact's runtime: when the cell is slower than eager
    # (slower), always, or never; over `profile_calls` calls
    profile: ProfileWhen = ProfileWhen.slower
    profile_calls: int = 20


@dataclass
class WrapConfig:
    state: StateMode = StateMode.auto
    strict_export: bool = False  # torch.export strict mode


class CacheVerify(str, Enum):
    stat = "stat"  # trust a file whose size, mtime and inode are as sealed; hash the others
    full = "full"  # hash every file of every hit (catches changes that restored the mtime)


@dataclass
class CacheConfig:
    enabled: bool = True
    dir: str = "outputs/cache"  # relative to the launch directory; shared by every sweep job
    refresh: List[str] = field(default_factory=list)  # stage names to recompute
    verify: CacheVerify = CacheVerify.stat


@dataclass
class RootConfig:
    model: ModelConfig = MISSING
    precision: PrecisionConfig = MISSING
    format: Any = MISSING  # an OnnxFormat or a PteFormat
    target: TargetConfig = MISSING
    preprocess: PreprocessConfig = MISSING
    calibration: CalibrationConfig = MISSING
    verify: VerifyConfig = MISSING
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    wrap: WrapConfig = field(default_factory=WrapConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    # each computing stage in a process of its own (pipelines/isolation.py): its own peak memory,
    # all of it returned after; false runs them in the job's process (a debugger can step in)
    isolate_stages: bool = True
    recipe: Optional[str] = None  # set by recipe files, for reports and run-dir names


def register() -> None:
    """Register the schema so conf/config.yaml can name it in its defaults, the resolver that
    names a raw-input cell's sweep directory (`..._int8_onnx_raw`), and those that size sweep
    jobs by memory (`sweep_jobs`: parallel local jobs; `job_memory_gb`: a Slurm job's request)."""
    from omegaconf import OmegaConf

    from .memory import job_memory_gb, sweep_jobs

    cs = ConfigStore.instance()
    cs.store(name="schema", node=RootConfig)
    for fmt, schema in FORMAT_SCHEMAS.items():
        cs.store(group="schema/format", name=fmt.value, node=schema)
    if not OmegaConf.has_resolver("cell_suffix"):
        OmegaConf.register_new_resolver("cell_suffix", lambda choice: "" if choice in (None, "none") else f"_{choice}")
    for name, resolver in (("sweep_jobs", sweep_jobs), ("job_memory_gb", job_memory_gb)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
