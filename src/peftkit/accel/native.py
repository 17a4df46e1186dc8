"""The CPU dropout kernels of ``native.c``, built once per machine with its C compiler.

Drawing a dropout mask from torch's CPU generator runs on one core, and applying it took three
passes over the tensor. ``native.c`` hashes a counter instead (splitmix64, vectorised, on torch's
OpenMP threads) and masks and rescales in the same pass. :mod:`peftkit.dropout` computes the
very same mask with torch ops when this module gives nothing, so results do not depend on
whether a compiler was found.

The library is built on first use into peftkit's cache folder (:func:`peftkit.fsio.cache_dir`)
under a name that hashes the source, the flags and the CPU's feature flags (it is compiled for
this CPU). ``PEFTKIT_NATIVE=0`` turns it off; ``CC`` picks the compiler (default ``cc``). A
failed build is remembered in the cache (a ``native-*.failed`` file; delete it to try again
after installing a compiler), so it is tried once per machine.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from ..fsio import cache_dir

SOURCE = Path(__file__).with_name("native.c")
# the first flags that build; OpenMP and -march=native are what make it fast, neither is required
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])


class Kernels:
    """The loaded library and the thread count its parallel loops may use."""

    def __init__(self, lib: ctypes.CDLL, parallel: bool):
        self.lib, self.parallel = lib, parallel
        i64, u64, i32, ptr, f32, i = (
            ctypes.c_int64,
            ctypes.c_uint64,
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_float,
            ctypes.c_int,
        )
        lib.peftkit_keep_mask.argtypes = [ptr, i64, u64, i32, i]
        for fn in (lib.peftkit_dropout_f32, lib.peftkit_dropout_bf16):
            fn.argtypes = [ptr, ptr, ptr, i64, i, u64, i32, f32, i]
        for fn in (lib.peftkit_keep_mask, lib.peftkit_dropout_f32, lib.peftkit_dropout_bf16):
            fn.restype = None

    def threads(self) -> int:
        import torch

        return torch.get_num_threads() if self.parallel else 1


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(target: Path) -> bool:
    """Compile ``SOURCE`` to ``target`` with the first flag set that works; atomically, so
    processes building at once do not see half a file."""
    compiler = os.environ.get("CC", "cc")
    target.parent.mkdir(parents=True, exist_ok=True)
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=120,
            )
            if done.returncode == 0:
                os.replace(tmp, target)
                return True
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return False


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files this process has mapped (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps.splitlines() if any(n in line.rsplit("/", 1)[-1] for n in names)}


@functools.cache
def kernels() -> Kernels | None:
    """The kernels, building them first if need be; None where they are off or cannot be built."""
    if os.environ.get("PEFTKIT_NATIVE", "1") == "0":
        return None
    import torch  # noqa: F401  (its OpenMP runtime must be loaded first, for the check below)

    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), repr(_FLAG_SETS), os.environ.get("CC", "cc"), platform.machine(), _cpu_flags()]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"native-{key}.so"
    failed = target.with_suffix(".failed")
    try:
        if not target.exists() and (failed.exists() or not _build(target)):
            failed.touch()
            return None
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    # Parallel only when the library shares torch's OpenMP runtime (and so its threads): a second
    # runtime would bring a second set of spinning threads onto the same cores.
    parallel = len(_openmp_runtimes()) == 1
    return Kernels(lib, parallel)
