"""Emulated device runtimes: run a .onnx (onnxruntime) and a .pte (ExecuTorch) on CPUs this host is not.

Builds, from PyPI and Debian's mirrors only, one tree under $DEVICE_RUNTIMES (default
~/.cache/export-pipeline/device-runtimes)/<key>/:
  qemu/      static qemu-aarch64 and qemu-x86_64 10.0 from Debian 13's `qemu-user` (fetched with a private
             apt configuration, never touching the host's dpkg). Debian 12's qemu 7.2 passes the host's
             /proc/cpuinfo through (torch and onnxruntime then crash at import) and its `-cpu max` gives
             wrong int8 results; 10.0 emulates cpuinfo per CPU model. binfmt_misc is not mounted here, so
             qemu is always called explicitly.
  sysroot/   Debian 12's arm64 python3.11 and the libraries it loads (private apt, `dpkg -x`), with the
             aarch64 cp311 wheels of the versions requirements.txt pins (torch, executorch, onnxruntime,
             numpy, onnxruntime-extensions, + typing_extensions at the host venv's version) in
             usr/local/lib/python3.11/dist-packages, byte-compiled by the host's CPython 3.11 (same
             bytecode; imports about 3x faster under emulation).
  stubs/     PyPI's aarch64 torch is a CUDA build whose nvidia-* wheels are not all published for aarch64,
             and ExecuTorch's bindings link libtorch: no-op aarch64 .so files (cross gcc) export every
             undefined, versioned CUDA symbol the wheels' ELF files ask for (read with readelf), so
             `import torch` works with CUDA absent. Each stub function returns 100 (cudaErrorNoDevice).
x86-64 without AVX-512/VNNI is the project's own venv python under `qemu-x86_64 -cpu Haswell`.

`import executorch.runtime` (and `executorch.extension.pybindings.portable_lib`, through
executorch.exir) pulls in exir/dynamo/inductor; the lightest import that loads and runs a .pte is
`import torch; from executorch.extension.pybindings._C import _load_for_executorch` (XNNPACK included).

    python3 devices/install.py           build (idempotent: a ready tree is a no-op; --force rebuilds)
    python3 devices/install.py --check   smoke test on every emulated CPU model, one table
    from devices.install import runtime_command, ready_tree
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUIREMENTS = REPO / "requirements.txt"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
VENV_STAMP = REPO / ".venv" / ".installed"

ARM64_CPUS = ("cortex-a76", "cortex-a55", "cortex-a53", "neoverse-n1")
X86_CPUS = ("Haswell",)
PLATFORM = "manylinux_2_28_aarch64"
PYVER = "3.11"
# what the emulated runtimes import: the pinned wheels, plus the one pure-Python module torch's import
# needs (found with `python -X importtime`; tqdm, sympy, filelock... are optional or lazy)
PINNED_WHEELS = ("torch", "executorch", "onnxruntime", "numpy", "onnxruntime-extensions")
UNPINNED_WHEELS = ("typing_extensions",)  # at the version the host venv resolved
# arm64 Debian 12 packages asked for; apt resolves the rest of their dependencies
ARM64_DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libstdc++6",
              "libgcc-s1", "zlib1g", "libexpat1", "libffi8", "libssl3", "libatomic1")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _host_mirrors() -> tuple[str, str]:
    """(the Debian archive, its security archive) this host's apt is configured with: the private
    apt configurations below use the same mirrors, never a hard-coded one."""
    uris: list[str] = []
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        uris += [u for line in path.read_text().splitlines() if line.startswith("URIs:") for u in line.split()[1:]]
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt").glob("sources.list.d/*.list"))]:
        if path.is_file():
            uris += [line.split()[1] for line in path.read_text().splitlines()
                     if line.startswith("deb ") and "[" not in line.split()[1]]
    archive = next((u for u in uris if "security" not in u), None)
    security = next((u for u in uris if "security" in u), None)
    if not archive or not security:
        sys.exit("devices/install.py: no Debian archive and security archive in /etc/apt's sources: "
                 "configure apt for Debian 12 (bookworm) first")
    return archive.rstrip("/"), security.rstrip("/")


def _sources(suite: str) -> str:
    archive, security = _host_mirrors()
    lines = [f"{archive} {suite} main"]
    if suite == "bookworm":
        lines += [f"{archive} bookworm-updates main", f"{security} bookworm-security main"]
    return "".join(f"deb [signed-by={KEYRING}] {line}\n" for line in lines)


QEMU_DEB = "qemu-user"
QEMU_BINARIES = ("qemu-aarch64", "qemu-x86_64")
CROSS_GCC = "aarch64-linux-gnu-gcc"
CROSS_GCC_DEB = "gcc-aarch64-linux-gnu"
# the libraries a stub may stand in for: CUDA's; any other unresolved library is an error
STUBBABLE = re.compile(r"^lib(cu|nv|nccl|caffe2_nvrtc)")
STUB_RETURN = 100  # cudaErrorNoDevice / CUDA_ERROR_NO_DEVICE
SITE = "usr/local/lib/python3.11/dist-packages"
HOST_ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "LD_LIBRARY_PATH",
                 "LD_PRELOAD", "QEMU_LD_PREFIX", "QEMU_CPU", "QEMU_SET_ENV", "QEMU_UNSET_ENV",
                 "VIRTUAL_ENV", "PYTHONEXECUTABLE")


# ---------------------------------------------------------------- where the tree is (cheap, no network)

def root() -> Path:
    return Path(os.environ.get("DEVICE_RUNTIMES") or Path.home() / ".cache/export-pipeline/device-runtimes")


def _requirement_pins() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _venv_version(name: str) -> str | None:
    site = REPO / ".venv" / "lib" / f"python{PYVER}" / "site-packages"
    for dist in site.glob("*.dist-info"):
        n, _, v = dist.name[:-len(".dist-info")].partition("-")
        if _norm(n) == _norm(name):
            return v
    return None


def pins() -> dict[str, str]:
    """name -> version of every wheel installed into the arm64 tree."""
    req = _requirement_pins()
    out = {}
    for name in PINNED_WHEELS:
        if _norm(name) not in req:
            raise SystemExit(f"devices/install.py: {REQUIREMENTS} pins no {name}")
        out[name] = req[_norm(name)]
    for name in UNPINNED_WHEELS:
        version = req.get(_norm(name)) or _venv_version(name)
        if not version:
            raise SystemExit(f"devices/install.py: no version for {name}: not pinned in requirements.txt and "
                             f"not in {REPO / '.venv'} (run `make setup` first)")
        out[name] = version
    return out


def _recipe() -> dict:
    """What the tree depends on that is known without the network (the debs' versions are not)."""
    return {"pins": pins(), "install_py": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}


def _recipe_id(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def tree_key(recipe: dict, debs: list[str]) -> str:
    """First 16 hex of sha256 over the pinned versions, the debs with versions and this file."""
    blob = json.dumps({"pins": recipe["pins"], "debs": sorted(debs), "install_py": recipe["install_py"]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ready_tree() -> Path | None:
    """The newest ready tree built by this very recipe (this file + the pins), or None."""
    try:
        recipe_id = _recipe_id(_recipe())
    except (OSError, SystemExit):
        return None
    best = None
    for stamp in root().glob("*/READY.json"):
        try:
            info = json.loads(stamp.read_text())
        except (OSError, ValueError):
            continue
        if info.get("recipe_id") == recipe_id and info.get("key") == stamp.parent.name:
            if best is None or info.get("finished", 0) > best[0]:
                best = (info.get("finished", 0), stamp.parent)
    return best[1] if best else None


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HOST_ENV_DROP}
    env.update(PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def runtime_command(arch: str, cpu: str) -> tuple[list[str], dict[str, str]] | str:
    """(argv prefix running a Python for the emulated `cpu` -- append `script.py args...` --, the full
    environment to run it with), or a one-line reason when it cannot run here."""
    if arch not in ("arm64", "aarch64", "x86_64", "amd64", "x86-64"):
        return f"no emulated runtime for isa {arch!r} (devices/install.py builds arm64 and x86_64)"
    tree = ready_tree()
    if tree is None:
        return f"no emulated device runtimes are built for this checkout ({root()}): run `make device-runtimes`"
    env = _clean_env()
    if arch in ("arm64", "aarch64"):
        sysroot = tree / "sysroot"
        env.update(PYTHONPATH=str(sysroot / SITE), LD_LIBRARY_PATH=str(tree / "stubs"))
        return [str(tree / "qemu" / "qemu-aarch64"), "-L", str(sysroot), "-cpu", cpu,
                str(sysroot / "usr/bin/python3.11")], env
    if not VENV_PYTHON.exists():  # x86_64: the project's own venv under an older x86 CPU model
        return f"{VENV_PYTHON} is missing: run `make setup` (then `make device-runtimes`)"
    return [str(tree / "qemu" / "qemu-x86_64"), "-cpu", cpu, str(VENV_PYTHON)], env


# ---------------------------------------------------------------- building

def log(msg: str) -> None:
    print(f"[device-runtimes] {msg}", flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run([str(c) for c in cmd], **kw)


class PrivateApt:
    """apt-get with its own sources, state and cache: the host's dpkg database is never read or changed."""

    def __init__(self, base: Path, arch: str, sources: str):
        self.base = base
        for d in ("etc/parts", "etc/prefs", "state/lists/partial", "cache/archives/partial"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "state/status").touch()
        (base / "etc/sources.list").write_text(sources)
        conf = {
            "Dir::Etc::sourcelist": base / "etc/sources.list", "Dir::Etc::sourceparts": base / "etc/parts",
            "Dir::Etc::parts": base / "etc/parts", "Dir::Etc::preferencesparts": base / "etc/prefs",
            "Dir::Etc::preferences": base / "etc/preferences",
            "Dir::State": base / "state", "Dir::State::status": base / "state/status",
            "Dir::Cache": base / "cache", "APT::Architecture": arch, "APT::Architectures": arch,
            "Debug::NoLocking": "true", "Acquire::Languages": "none",
            "APT::Sandbox::User": "root", "APT::Install-Recommends": "false",
        }
        (base / "apt.conf").write_text("".join(f'{k} "{v}";\n' for k, v in conf.items()))
        self.env = {**os.environ, "APT_CONFIG": str(base / "apt.conf"), "LC_ALL": "C"}

    def __call__(self, *args, cwd=None, capture=False) -> str:
        r = run(["apt-get", "-q", *args], env=self.env, cwd=cwd, capture_output=capture, text=True)
        return r.stdout if capture else ""

    def update(self):
        self("update", "-qq", capture=True)

    def resolve(self, packages, with_deps=True) -> list[dict]:
        """[{name, version, file, url, size}] of what `packages` needs (their dependencies too)."""
        if with_deps:
            out = self("install", "-y", "-d", "--print-uris", "-qq", *packages, capture=True)
        else:
            out = self("download", "--print-uris", "-qq", *packages, capture=True)
        debs = []
        for line in out.splitlines():
            m = re.match(r"^'([^']+)' (\S+) (\d+) ", line)
            if not m:
                continue
            url, file, size = m.group(1), m.group(2), int(m.group(3))
            name, version, _arch = file[:-len(".deb")].split("_")
            debs.append({"name": name, "version": version.replace("%3a", ":"), "file": file, "url": url,
                         "size": size})
        return debs

    def download(self, debs: list[dict], dest: Path) -> int:
        """Fetch into dest what is not there yet; returns bytes downloaded."""
        dest.mkdir(parents=True, exist_ok=True)
        todo = [d for d in debs if not (dest / d["file"]).exists()]
        if todo:
            self("download", "-qq", *[f"{d['name']}={d['version']}" for d in todo], cwd=dest)
        missing = [d["file"] for d in debs if not (dest / d["file"]).exists()]
        if missing:
            raise SystemExit(f"devices/install.py: apt-get download left out {missing}")
        return sum(d["size"] for d in todo)


def wait_for_venv(timeout: float = 3600, grace: float = 60) -> None:
    """The x86 runtime is the project's venv: wait while `make setup` creates it (it may be running
    beside this), fail at once with the fix when nothing is creating it."""
    if VENV_STAMP.exists():
        return
    log(f"waiting for {VENV_STAMP} (`make setup`)...")
    start = time.time()
    while not VENV_STAMP.exists():
        waited = time.time() - start
        if waited > timeout or (waited > grace and not VENV_STAMP.parent.exists()):
            raise SystemExit(f"devices/install.py: {VENV_STAMP} is missing: run `make setup` first")
        time.sleep(5)


def host_python311() -> str:
    """A CPython 3.11 on the host: it byte-compiles the arm64 tree (the bytecode is the same)."""
    if sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11):
        return sys.executable
    if VENV_PYTHON.exists():
        return str(VENV_PYTHON)
    raise SystemExit("devices/install.py: no CPython 3.11 on the host to byte-compile with")


def ensure_cross_gcc() -> str:
    gcc = shutil.which(CROSS_GCC)
    if gcc and shutil.which("readelf"):
        return gcc
    log(f"installing {CROSS_GCC_DEB} and binutils on the host (apt-get) for the CUDA stubs")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=900",
               CROSS_GCC_DEB, "binutils"]
    if run(install, env=env, check=False).returncode != 0:
        run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=900"], env=env)
        run(install, env=env)
    gcc = shutil.which(CROSS_GCC)
    if not gcc:
        raise SystemExit(f"devices/install.py: {CROSS_GCC} missing after installing {CROSS_GCC_DEB}")
    return gcc


def dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def fetch_wheels(versions: dict[str, str], cache: Path) -> tuple[list[Path], int]:
    cache.mkdir(parents=True, exist_ok=True)
    before = {p.name: p.stat().st_size for p in cache.glob("*.whl")}
    os.environ.setdefault("PIP_ROOT_USER_ACTION", "ignore")
    run([host_python311(), "-m", "pip", "download", "-qq", "--disable-pip-version-check", "--no-deps",
         "--only-binary=:all:", "--platform", PLATFORM, "--python-version", PYVER, "--implementation", "cp",
         "--abi", "cp311", "-d", cache, *[f"{n}=={v}" for n, v in versions.items()]])
    wheels = []
    for name, version in versions.items():
        prefix = f"{name.replace('-', '_')}-{version}-".lower()
        found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(prefix)]
        if not found:
            raise SystemExit(f"devices/install.py: pip download gave no wheel for {name}=={version}")
        wheels.append(sorted(found)[-1])
    downloaded = sum(p.stat().st_size for p in cache.glob("*.whl") if p.name not in before)
    return wheels, downloaded


# ---- ELF data (readelf) for the stubs

def _readelf(args, path: Path) -> str:
    return run(["readelf", "-W", *args, path], capture_output=True, text=True, check=False).stdout


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def elf_dynamic(path: Path) -> tuple[list[str], list[str]]:
    needed, runpath = [], []
    for line in _readelf(["-d"], path).splitlines():
        m = re.search(r"\((NEEDED|RUNPATH|RPATH)\)\s+.*?\[(.*)\]", line)
        if m:
            (needed if m.group(1) == "NEEDED" else runpath).extend(
                [m.group(2)] if m.group(1) == "NEEDED" else m.group(2).split(":"))
    return needed, runpath


def elf_symbols(path: Path) -> tuple[set[str], list[tuple[str, str, str, str]]]:
    """(defined dynamic symbols, [(name, version or '', type, bind) of the undefined ones])."""
    defined, undefined = set(), []
    for line in _readelf(["--dyn-syms"], path).splitlines():
        parts = line.split()
        if len(parts) < 8 or not parts[0].endswith(":"):
            continue
        typ, bind, ndx, name = parts[3], parts[4], parts[6], parts[7]
        base, _, version = name.partition("@")
        version = version.lstrip("@")
        if ndx == "UND":
            if base:
                undefined.append((base, version, typ, bind))
        else:
            defined.add(base)
    return defined, undefined


def elf_version_needs(path: Path) -> dict[str, str]:
    """version name -> the library file that must define it (.gnu.version_r)."""
    out, current = {}, None
    text = _readelf(["-V"], path)
    section = text.split(".gnu.version_r", 1)
    for line in (section[1] if len(section) > 1 else "").splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and current:
            out[m.group(1)] = current
    return out


def build_stubs(site: Path, sysroot: Path, stubs: Path, gcc: str) -> dict[str, int]:
    """Stub .so files for every library the wheels' ELF files need that neither the wheels nor the
    sysroot provide, exporting exactly the symbols (and symbol versions) asked of them."""
    lib_dirs = [sysroot / d for d in ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib", "usr/lib")]
    elves = [p for p in site.rglob("*.so*") if p.is_file() and not p.is_symlink() and is_elf(p)]
    system = [p for d in lib_dirs if d.is_dir() for p in d.glob("*.so*") if is_elf(p)]
    info = {}
    for p in elves:
        needed, runpath = elf_dynamic(p)
        dirs = [Path(r.replace("$ORIGIN", str(p.parent))) for r in runpath] + lib_dirs + [p.parent]
        missing = [n for n in needed if not any((d / n).exists() for d in dirs)]
        info[p] = (needed, missing)
    missing_libs = sorted({m for _, miss in info.values() for m in miss})
    bad = [m for m in missing_libs if not STUBBABLE.match(m)]
    if bad:
        users = sorted({p.name for p, (_, miss) in info.items() if set(miss) & set(bad)})
        raise SystemExit(f"devices/install.py: {', '.join(bad)} (needed by {', '.join(users)}) are in neither "
                         "the wheels nor the arm64 sysroot and are no CUDA library to stub: add the Debian "
                         "package that ships them to ARM64_DEBS")
    defined: set[str] = set()
    for p in system + elves + [sysroot / "usr/bin/python3.11"]:
        defined |= elf_symbols(p)[0]
    wanted: dict[str, dict[str, tuple[str, str]]] = {lib: {} for lib in missing_libs}  # lib -> sym -> (ver, type)
    versions: dict[str, set[str]] = {lib: set() for lib in missing_libs}
    for p, (needed, missing) in info.items():
        if not missing:
            continue
        need_of = elf_version_needs(p)
        for ver, lib in need_of.items():
            if lib in versions:
                versions[lib].add(ver)
        for name, ver, typ, bind in elf_symbols(p)[1]:
            if ver:
                lib = need_of.get(ver)
                if lib in wanted:
                    wanted[lib].setdefault(name, (ver, typ))
            elif name not in defined and bind != "WEAK":
                for lib in missing:  # unversioned: any of the missing libraries this file needs may hold it
                    wanted[lib].setdefault(name, ("", typ))
    stubs.mkdir(parents=True, exist_ok=True)
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lib, syms in wanted.items():
            src, vmap = Path(tmp) / f"{lib}.c", Path(tmp) / f"{lib}.map"
            lines = ["/* generated by devices/install.py: a no-op stand-in, CUDA is absent */"]
            by_version: dict[str, list[str]] = {v: [] for v in sorted(versions[lib])}
            for i, (name, (ver, typ)) in enumerate(sorted(syms.items())):
                if typ == "OBJECT":
                    lines.append(f'char s{i}[256] __asm__("{name}") __attribute__((aligned(64))) = {{0}};')
                elif typ == "TLS":
                    lines.append(f'__thread char s{i}[256] __asm__("{name}");')
                else:
                    lines.append(f'long s{i}(void) __asm__("{name}"); long s{i}(void) {{ return {STUB_RETURN}; }}')
                by_version.setdefault(ver or (sorted(versions[lib]) or [""])[0], []).append(name)
            src.write_text("\n".join(lines) + "\n")
            cmd = [gcc, "-shared", "-fPIC", "-nostdlib", "-O0", "-Wl,--no-as-needed", f"-Wl,-soname,{lib}",
                   "-o", stubs / lib, src]
            nodes = {v: names for v, names in by_version.items() if v}
            if nodes:
                vmap.write_text("".join(f"{v} {{\n  global:\n{''.join(f'    {n};' + chr(10) for n in names)}}};\n"
                                        for v, names in nodes.items()))
                cmd.insert(-1, f"-Wl,--version-script={vmap}")
            run(cmd)
            counts[lib] = len(syms)
    return counts


def _extract_qemu(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        members = [f"./usr/bin/{b}" for b in QEMU_BINARIES]
        fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        run(["tar", "-x", "-C", tmp, *members], stdin=fsys.stdout)
        if fsys.wait() != 0:
            raise SystemExit(f"devices/install.py: dpkg-deb --fsys-tarfile {deb} failed")
        for b in QEMU_BINARIES:
            shutil.move(str(Path(tmp) / "usr/bin" / b), dest / b)


def prune(base: Path, keep: Path) -> None:
    """Remove the trees of other recipes (ready_tree() never returns them) and the leftovers of builds
    whose process is gone."""
    for d in base.iterdir():
        if d == keep or not d.is_dir():
            continue
        if (d / "READY.json").exists() and re.fullmatch(r"[0-9a-f]{16}", d.name):
            log(f"removing the tree of an older recipe: {d}")
            shutil.rmtree(d, ignore_errors=True)
        elif (m := re.match(r"^\.build-[0-9a-f]{16}-(\d+)-", d.name)) and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def build(force: bool = False) -> Path:
    start = time.time()
    base = root()
    if not force and (tree := ready_tree()):
        print(f"device runtimes ready: {tree} (nothing to do)")
        return tree
    wait_for_venv()
    base.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(base / ".lock", "w") as lock:  # one build of a root at a time; the next one then finds it ready
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another build of {base} is running: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not force and (tree := ready_tree()):
                print(f"device runtimes ready: {tree} (built by the other process)")
                return tree
        return _build_locked(base, force, start)


def _build_locked(base: Path, force: bool, start: float) -> Path:
    recipe = _recipe()
    cache = base / ".cache"
    log(f"resolving Debian packages (private apt: bookworm arm64, trixie {QEMU_DEB})")
    arm = PrivateApt(cache / "apt-bookworm-arm64", "arm64", _sources("bookworm"))
    tri = PrivateApt(cache / "apt-trixie-amd64", "amd64", _sources("trixie"))
    arm.update()
    tri.update()
    arm_debs = arm.resolve(ARM64_DEBS)
    qemu_debs = tri.resolve([QEMU_DEB], with_deps=False)
    debs = [f"{d['name']}:arm64={d['version']}" for d in arm_debs] + [f"{d['name']}:amd64={d['version']}" for d in qemu_debs]
    key = tree_key(recipe, debs)
    final = base / key
    if (final / "READY.json").exists() and not force:
        print(f"device runtimes ready: {final} (nothing to do)")
        return final
    downloaded = 0
    log(f"tree {key}: {len(arm_debs)} arm64 debs, {QEMU_DEB} {qemu_debs[0]['version']}, wheels {recipe['pins']}")
    downloaded += arm.download(arm_debs, cache / "debs")
    downloaded += tri.download(qemu_debs, cache / "debs")
    gcc = ensure_cross_gcc()
    wheels, got = fetch_wheels(recipe["pins"], cache / "wheels")
    downloaded += got
    timings = {}
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-{os.getpid()}-", dir=base))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the tree from other users
    try:
        t = time.time()
        _extract_qemu(cache / "debs" / qemu_debs[0]["file"], work / "qemu")
        sysroot = work / "sysroot"
        for d in arm_debs:
            run(["dpkg-deb", "-x", cache / "debs" / d["file"], sysroot])
        # the arm64 python must never see the host's x86 packages through qemu's -L fallback to host
        # paths: these directories exist in the sysroot, so qemu looks no further
        for d in (SITE, "usr/lib/python3/dist-packages", "usr/local/lib/python3/dist-packages",
                  "usr/lib/python3.11/site-packages"):
            (sysroot / d).mkdir(parents=True, exist_ok=True)
        timings["debs"] = round(time.time() - t, 1)
        t = time.time()
        log(f"installing {len(wheels)} aarch64 wheels into the sysroot")
        run([host_python311(), "-m", "pip", "install", "-qq", "--disable-pip-version-check", "--no-deps",
             "--no-index", "--only-binary=:all:", "--platform", PLATFORM, "--python-version", PYVER,
             "--implementation", "cp", "--abi", "cp311", "--no-compile", "--target", sysroot / SITE, *wheels])
        timings["wheels"] = round(time.time() - t, 1)
        t = time.time()
        log("building CUDA stubs from the wheels' ELF dependency data")
        stubs = build_stubs(sysroot / SITE, sysroot, work / "stubs", gcc)
        timings["stubs"] = round(time.time() - t, 1)
        t = time.time()
        log("byte-compiling with the host's CPython 3.11")
        for tree, guest in ((sysroot / "usr/lib/python3.11", "/usr/lib/python3.11"), (sysroot / SITE, "/" + SITE)):
            run([host_python311(), "-m", "compileall", "-q", "-j", "2", "-s", tree, "-p", guest, tree],
                check=False, stdout=subprocess.DEVNULL)
        timings["compileall"] = round(time.time() - t, 1)
        if final.exists():  # a half-built or stale tree with this key
            shutil.rmtree(final)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    seconds = round(time.time() - start, 1)
    stamp = {
        "key": key, "recipe_id": _recipe_id(recipe), "versions": recipe["pins"], "debs": debs,
        "qemu": qemu_debs[0]["version"], "stubs": stubs,
        "sizes": {"tree": dir_size(final), "sysroot": dir_size(final / "sysroot"),
                  "site_packages": dir_size(final / "sysroot" / SITE), "downloaded": downloaded},
        "seconds": seconds, "timings": timings, "finished": time.time(),
    }
    tmp = final / "READY.json.tmp"
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.rename(tmp, final / "READY.json")
    prune(base, keep=final)
    log(f"ready: {final} ({stamp['sizes']['tree'] / 1e6:.0f} MB, {downloaded / 1e6:.0f} MB downloaded, {seconds} s)")
    return final


# ---------------------------------------------------------------- --check

MAKE_MODELS = r'''
import json, sys, warnings
from pathlib import Path
import numpy as np, torch
warnings.filterwarnings("ignore")
out = Path(sys.argv[1])
torch.manual_seed(0)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)
    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))

model = Net().eval()
x = torch.randn(1, 3, 16, 16)
np.save(out / "input.npy", x.numpy())
made = {}
torch.onnx.export(model, (x,), str(out / "fp32.onnx"), input_names=["x"], output_names=["y"], dynamo=False)
made["fp32.onnx"] = True
try:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    class Reader(CalibrationDataReader):
        def __init__(self): self.items = iter([{"x": torch.randn(1, 3, 16, 16).numpy()} for _ in range(8)])
        def get_next(self): return next(self.items, None)
    quantize_static(str(out / "fp32.onnx"), str(out / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    made["int8.onnx"] = True
except Exception as e:
    print("int8.onnx not made:", e, file=sys.stderr)
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import to_edge_transform_and_lower
ep = torch.export.export(model, (x,))
pte = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
(out / "fp32.pte").write_bytes(pte.buffer)
try:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    m = prepare_pt2e(torch.export.export(model, (x,)).module(), q)
    for _ in range(8):
        m(torch.randn(1, 3, 16, 16))
    m = convert_pt2e(m)
    ep = torch.export.export(m, (x,))
    pte = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    (out / "int8.pte").write_bytes(pte.buffer)
except Exception as e:
    print("int8.pte not made:", e, file=sys.stderr)
'''

RUN_MODELS = r'''
import json, sys, time
t0 = time.time()
from pathlib import Path
d = Path(sys.argv[1])
res = {"features": "", "results": {}}
import platform
if platform.machine() == "x86_64":
    # qemu-x86_64 passes the host's /proc/cpuinfo through: ask CPUID, as MLAS, XNNPACK and torch do
    import ctypes, mmap
    code = bytes.fromhex("5389f889f14989d00fa241890041895804418948084189500c5bc3")
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(addr)
    def leaf(a, c=0):
        out = (ctypes.c_uint32 * 4)()
        cpuid(a, c, out)
        return list(out)
    l1, l7, l71 = leaf(1), leaf(7), leaf(7, 1)
    bits = {"fma": l1[2] >> 12, "f16c": l1[2] >> 29, "avx2": l7[1] >> 5, "avx512f": l7[1] >> 16,
            "avx512bw": l7[1] >> 30, "avx512_vnni": l7[2] >> 11, "avx_vnni": l71[0] >> 4,
            "amx_int8": l7[3] >> 25}
    res["features"] = " ".join(k for k, v in bits.items() if v & 1) + " (cpuid)"
else:
    for line in open("/proc/cpuinfo"):
        k, _, v = line.partition(":")
        if k.strip() in ("Features", "flags"):
            res["features"] = v.strip()
            break
import numpy as np
x = np.load(d / "input.npy")
t = time.time()
import onnxruntime as ort
res["import_onnxruntime"] = time.time() - t
for f in sorted(d.glob("*.onnx")):
    try:
        so = ort.SessionOptions(); so.intra_op_num_threads = 1
        s = ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"])
        y = s.run(None, {"x": x})[0]
        t = time.time(); n = 5
        for _ in range(n): s.run(None, {"x": x})
        res["results"][f.name] = {"y": y.tolist(), "ms": (time.time() - t) / n * 1e3}
    except Exception as e:
        res["results"][f.name] = {"error": repr(e)[:300]}
t = time.time()
import torch
from executorch.extension.pybindings._C import _load_for_executorch
res["import_executorch"] = time.time() - t
res["capability"] = torch.backends.cpu.get_cpu_capability()
res["backends"] = __import__("executorch.extension.pybindings._C", fromlist=["_"])._get_registered_backend_names()
for f in sorted(d.glob("*.pte")):
    try:
        m = _load_for_executorch(str(f))
        y = m.forward((torch.from_numpy(x),))[0].numpy()
        t = time.time(); n = 5
        for _ in range(n): m.forward((torch.from_numpy(x),))
        res["results"][f.name] = {"y": y.tolist(), "ms": (time.time() - t) / n * 1e3}
    except Exception as e:
        res["results"][f.name] = {"error": repr(e)[:300]}
res["total"] = time.time() - t0
print("RESULT " + json.dumps(res))
'''


def check() -> int:
    tree = ready_tree()
    if tree is None:
        print(runtime_command("arm64", ARM64_CPUS[0]))
        return 1
    print(f"checking {tree}")
    with tempfile.TemporaryDirectory(prefix="device-runtimes-check-") as tmp:
        d = Path(tmp)
        (d / "make.py").write_text(MAKE_MODELS)
        (d / "run.py").write_text(RUN_MODELS)
        env = _clean_env()
        run([VENV_PYTHON, d / "make.py", d], env=env, cwd=d)
        rows = [("host", "native", [str(VENV_PYTHON)], env)]
        rows += [(cpu, "arm64", *runtime_command("arm64", cpu)) for cpu in ARM64_CPUS]
        rows += [(cpu, "x86_64", *runtime_command("x86_64", cpu)) for cpu in X86_CPUS]
        results, failed = {}, 0
        for cpu, arch, argv, renv in rows:
            t = time.time()
            p = subprocess.run([*argv, str(d / "run.py"), str(d)], env=renv, cwd=d, capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode or not line:
                print(f"{cpu}: failed (rc {p.returncode}) in {time.time() - t:.0f} s\n{p.stderr[-3000:]}")
                failed += 1
                continue
            results[cpu] = (arch, json.loads(line[len("RESULT "):]), time.time() - t)
        host = results.get("host", (None, {"results": {}}, 0))[1]["results"]
        print()
        print(f"{'cpu':<12} {'arch':<7} {'wall s':>6} {'ort imp s':>9} {'et imp s':>8}  "
              f"{'artifact':<10} {'ok':<3} {'ms/call':>8} {'max|d| vs host':>14}  features")
        interesting = re.compile(r"^(asimd|fphp|asimdhp|asimddp|i8mm|bf16|sve|sve2|sme|avx2|avx512f|avx512_vnni|"
                                 r"avx_vnni|avx512_bf16|amx_int8|fma|f16c|avx512_fp16)$")
        for cpu, (arch, r, wall) in results.items():
            feats = " ".join(f for f in r["features"].split() if interesting.match(f)) or "-"
            feats += f"  [torch: {r.get('capability')}]"
            first = True
            for name, out in r["results"].items():
                if "error" in out:
                    ok, diff, ms = "NO", out["error"][:60], ""
                    failed += 1
                else:
                    ok, ms = "yes", f"{out['ms']:.1f}"
                    ref = host.get(name, {}).get("y")
                    diff = "-" if ref is None else f"{_maxdiff(out['y'], ref):.3g}"
                lead = (f"{cpu:<12} {arch:<7} {wall:>6.1f} {r['import_onnxruntime']:>9.1f} "
                        f"{r['import_executorch']:>8.1f}") if first else " " * 46
                print(f"{lead}  {name:<10} {ok:<3} {ms:>8} {diff:>14}  {feats if first else ''}")
                first = False
            if "XnnpackBackend" not in r.get("backends", []):
                print(f"{'':<12} XnnpackBackend not registered: {r.get('backends')}")
                failed += 1
        return 1 if failed else 0


def _maxdiff(a, b) -> float:
    fa, fb = _flat(a), _flat(b)
    return max((abs(x - y) for x, y in zip(fa, fb)), default=0.0) if len(fa) == len(fb) else float("inf")


def _flat(v):
    return [y for x in v for y in _flat(x)] if isinstance(v, list) else [v]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        return check()
    build(force="--force" in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
