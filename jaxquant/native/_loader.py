"""Find and load the native extension built by ``pip install`` (setup.py ``build_ext``).

The extension links ``libdnnl.so.3`` from the ``onednn-cpu-gomp`` wheel, which installs it under
``<prefix>/lib``. An rpath cannot name that directory for every install layout (site-packages,
editable checkouts, ``--user``), so the library is loaded here with ``RTLD_GLOBAL`` first and the
extension's ``DT_NEEDED`` entry then resolves to it. Nothing is loaded from a path a file names.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import site
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
DNNL_SONAME = "libdnnl.so.3"


def _dnnl_candidates() -> list[str]:
    prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix]
    try:
        prefixes.append(site.getuserbase())
    except Exception:  # noqa: BLE001 - site may be stubbed in embedded interpreters
        pass
    paths = [os.path.join(p, "lib", DNNL_SONAME) for p in dict.fromkeys(prefixes)]
    return [p for p in paths if os.path.exists(p)]


@functools.lru_cache(maxsize=None)
def load() -> tuple[object, str]:
    """``(ctypes.CDLL or None, reason)``; reason is ``""`` when the library loaded."""
    if sys.platform != "linux":
        return None, f"the native backend is built for Linux only (this is {sys.platform})"
    libs = sorted(glob.glob(os.path.join(_HERE, "_jaxquant_native*.so")))
    if not libs:
        return None, ("the native extension was not built (pip install printed why: it needs g++ and the "
                      "onednn-devel-cpu-gomp wheel); reinstall with `pip install -e .` to build it")
    dnnl = _dnnl_candidates()
    # oneDNN's GNU OpenMP workers run inside XLA custom calls; spinning after each parallel region
    # (libgomp's default) takes the cores from XLA's own thread pool, which runs the next kernel.
    # libgomp reads this once, when it is loaded (here, with libdnnl); an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if dnnl:
            ctypes.CDLL(dnnl[0], mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(libs[0])
    except OSError as e:
        return None, (f"the native extension {os.path.basename(libs[0])} did not load ({e}); "
                      "install the onednn-cpu-gomp wheel (pip install onednn-cpu-gomp==2023.2.0)")
    lib.jq_gemv_supported.restype = ctypes.c_int
    lib.jq_last_error.restype = ctypes.c_char_p
    lib.jq_conv_packed_size.restype = ctypes.c_int64
    lib.jq_conv_packed_size.argtypes = [ctypes.c_void_p]
    lib.jq_conv_pack.restype = ctypes.c_int
    lib.jq_conv_pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.jq_conv_impl_name.restype = ctypes.c_int
    lib.jq_conv_impl_name.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_char_p, ctypes.c_int64]
    lib.jq_matmul_impl_name.restype = ctypes.c_int
    lib.jq_matmul_impl_name.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_char_p,
                                        ctypes.c_int64]
    return lib, ""
