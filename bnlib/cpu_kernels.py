"""bnlib's fused CPU kernels: build, load, and say whether they can run.

The kernels are C++ (``bnlib/csrc/batch_norm_cpu.cpp``), registered as torch
operators ``torch.ops.bnlib_cpu.*``. They are compiled on first use with the
machine's C++ compiler against the installed torch, with no build system
beyond one compiler command, and the library is cached under
``$BNLIB_CACHE_DIR`` (default ``~/.cache/bnlib``), keyed by a hash of the
source, the torch version, the compiler and the whole compile command (which
names torch's folder and the instruction set), so a change to any of them
rebuilds. ``make`` builds it while it sets up (``python
-m bnlib.cpu_kernels``), so the first chapter does not wait for the compiler.

Where no compiler is found, or the build fails, :func:`is_available` is False
(with one warning saying why) and ``bnlib.functional`` uses its tensor-op path
instead; the results agree within float rounding. ``BNLIB_CPU_KERNELS=0`` in
the environment turns the kernels off.
"""

import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["SOURCE", "build", "compile_command", "is_available", "library_path", "load"]

SOURCE = Path(__file__).with_name("csrc") / "batch_norm_cpu.cpp"
NAMESPACE = "bnlib_cpu"

_state = {"loaded": None, "error": None}


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_flags():
    """The CPU's instruction-set flags (the ``flags`` line of /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cxx):
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _private_dir(path):
    """``path`` created for this user alone (mode 0700), or None when it
    exists and belongs to someone else or others may write to it: a shared
    temporary folder must not let another user plant a library here."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    return path


def _cache_dir():
    """``$BNLIB_CACHE_DIR``, else ``~/.cache/bnlib``; a private per-user
    temporary folder where the home folder cannot be written (a read-only HOME)."""
    explicit = os.environ.get("BNLIB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    root = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "bnlib"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    fallback = _private_dir(Path(tempfile.gettempdir()) / f"bnlib-{os.getuid()}")
    if fallback is None:
        raise RuntimeError("no private, writable folder to cache the compiled kernels in (set BNLIB_CACHE_DIR)")
    return fallback


def _isa_flags():
    """Instruction-set flags: AVX2 where the CPU has it, else the compiler's
    default. Not -march=native: a fixed vector width makes the order of the
    vectorized sums, and so every last bit, the same on every AVX2 machine
    (an AVX-512 one included), which the book's stored outputs rely on."""
    return ["-mavx2"] if "avx2" in _cpu_flags().split() else []


def compile_command(source, output, cxx):
    """The one compiler command that builds the library (no build system)."""
    torch_dir = Path(torch.__file__).parent
    lib_dir = torch_dir / "lib"
    return [
        cxx,
        "-O3",
        *_isa_flags(),
        # No fused multiply-adds behind the code's back: results must not
        # depend on whether the CPU has FMA.
        "-ffp-contract=off",
        "-std=c++20",
        "-fPIC",
        "-shared",
        # at::parallel_for is OpenMP inside torch: compiled with -fopenmp, these
        # loops run on torch's own thread pool (the libgomp torch has loaded).
        "-fopenmp",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        str(source),
        "-o",
        str(output),
        f"-L{lib_dir}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{lib_dir}",
    ]


def library_path():
    """Where the library for this source, torch, compiler and command lives (built or not)."""
    cxx = _compiler() or "none"
    key = hashlib.sha256()
    # The compile command names torch's folder: the library is built against
    # that installation's headers and linked to its libraries (two venvs get
    # two builds), and any change of flags rebuilds.
    command = compile_command("SOURCE", "OUTPUT", cxx)
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(command).encode(),
                 _compiler_version(cxx).encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_dir() / f"{NAMESPACE}_{key.hexdigest()[:16]}.so"


def build(verbose=False):
    """Compile the library unless the cache already holds it; return its path.

    Safe to call from several processes at once (a file lock; the library is
    written under a temporary name and renamed into place).

    Raises:
        RuntimeError: no C++ compiler, or the compiler failed (its output is
            in the message).
    """
    cxx = _compiler()
    if cxx is None or shutil.which(cxx) is None:
        raise RuntimeError(f"C++ compiler {cxx or 'c++'!r} not found (set CXX, or install g++)")
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():  # another process built it while we waited
            return path
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        cmd = compile_command(SOURCE, tmp, cxx)
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        os.replace(tmp, path)
    return path


def _load_library():
    """Build if needed and load; a cached file that will not load (truncated
    by a crash, say) is deleted and built once more."""
    path = build()
    try:
        torch.ops.load_library(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        torch.ops.load_library(str(build()))
    _register_fakes()


def _register_fakes():
    """Shapes-only versions of the operators, so ``torch.compile`` can trace
    through them (it runs them on "fake" tensors that hold no data)."""
    lib = f"{NAMESPACE}::"

    def per_channel(x):
        return x.new_empty((x.shape[1],))

    @torch.library.register_fake(lib + "batch_norm_forward")
    def _(x, weight, bias, running_mean, running_var, momentum, eps):
        return torch.empty_like(x), per_channel(x), per_channel(x), per_channel(x)

    @torch.library.register_fake(lib + "batch_norm_backward")
    def _(dy, x, mean, invstd, weight, input_grad):
        dx = torch.empty_like(x) if input_grad else x.new_empty((0,))
        return dx, per_channel(x), per_channel(x)

    @torch.library.register_fake(lib + "batch_norm_eval")
    def _(x, weight, bias, running_mean, running_var, eps):
        return torch.empty_like(x), per_channel(x)

    @torch.library.register_fake(lib + "update_running_stats")
    def _(running_mean, running_var, mean, var, m, momentum):
        return None

    @torch.library.register_fake(lib + "batch_norm_stats")
    def _(x):
        return per_channel(x), per_channel(x)

    @torch.library.register_fake(lib + "batch_norm_backward_reduce")
    def _(dy, x, mean):
        return per_channel(x), per_channel(x)

    @torch.library.register_fake(lib + "batch_norm_backward_elemt")
    def _(dy, x, mean, k, a, b):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "grouped_norm_forward")
    def _(x, weight, bias, rows, inner, params, eps, centered):
        per_row = x.new_empty((rows,))
        return torch.empty_like(x), per_row, per_row.clone(), per_row.clone()

    @torch.library.register_fake(lib + "grouped_norm_backward")
    def _(dy, x, mean, invstd, weight, inner, centered, input_grad, param_grads):
        dx = torch.empty_like(x) if input_grad else x.new_empty((0,))
        params = weight.numel() if param_grads else 0
        return dx, x.new_empty((params,)), x.new_empty((params,))

    @torch.library.register_fake(lib + "grouped_norm_forward_cl")
    def _(x, weight, bias, groups, eps, centered):
        per_row = x.new_empty((x.shape[0] * groups,))
        return torch.empty_like(x), per_row, per_row.clone(), per_row.clone()

    @torch.library.register_fake(lib + "grouped_norm_backward_cl")
    def _(dy, x, mean, invstd, weight, centered, input_grad, param_grads):
        dx = torch.empty_like(x) if input_grad else x.new_empty((0,))
        channels = x.shape[1] if param_grads else 0
        return dx, x.new_empty((channels,)), x.new_empty((channels,))


def load():
    """Build (if needed) and load the kernels once per process; True when they run here."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    if os.environ.get("BNLIB_CPU_KERNELS", "1") == "0":
        _state.update(loaded=False, error="turned off by BNLIB_CPU_KERNELS=0")
        return False
    try:
        if not hasattr(torch.ops, NAMESPACE) or not hasattr(getattr(torch.ops, NAMESPACE), "batch_norm_forward"):
            _load_library()
        _state["loaded"] = True
    except (RuntimeError, OSError) as err:
        _state.update(loaded=False, error=str(err))
        warnings.warn(
            f"bnlib's fused CPU kernels are not available ({str(err).splitlines()[0]}); "
            "bnlib.functional uses its tensor-op path on CPU",
            RuntimeWarning,
            stacklevel=3,
        )
    return _state["loaded"]


def is_available():
    """True when the fused CPU kernels are built and loaded (building them if needed)."""
    return load()


def ops():
    """``torch.ops.bnlib_cpu``, the registered operators (after :func:`load`)."""
    return getattr(torch.ops, NAMESPACE)


if __name__ == "__main__":
    # `python -m bnlib.cpu_kernels`: build now (make does this while it sets up).
    try:
        print(f"bnlib CPU kernels: {build(verbose='-v' in sys.argv)}")
    except RuntimeError as err:
        print(f"bnlib CPU kernels not built, the tensor-op path will be used: {err}", file=sys.stderr)
