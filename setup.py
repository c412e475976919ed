"""Builds jaxquant's optional native extension (jaxquant/native/csrc) with g++ during ``pip install``.

Everything else is in pyproject.toml. The extension needs g++ (C++17), the oneDNN 3.2 headers and
library from the ``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` wheels (build requirements) and the
XLA FFI headers (from jaxlib when it is importable, else the copy in csrc/third_party). If any of that
is missing the build prints why and the install continues: jaxquant then runs its pure-XLA kernels
(``jaxquant.native_backend_reason()`` says why).
"""
import os
import shlex
import shutil
import subprocess
import sys
from importlib import metadata

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("jaxquant", "native", "csrc")


def _wheel_file(dist: str, suffix: str) -> str:
    """Absolute path of the file ending in ``suffix`` that wheel ``dist`` installed."""
    for f in metadata.distribution(dist).files or ():
        path = os.path.normpath(os.path.abspath(str(f.locate())))
        if path.replace(os.sep, "/").endswith("/" + suffix):
            return path
    raise FileNotFoundError(f"{dist} has no file {suffix}")


def _ffi_include() -> str:
    try:
        import jax.ffi
        return jax.ffi.include_dir()
    except Exception:  # noqa: BLE001 - jax absent in an isolated build env
        return os.path.join(HERE, CSRC, "third_party")


class OptionalNativeBuild(build_ext):
    def build_extension(self, ext):
        try:
            self._build(ext)
        except Exception as e:  # noqa: BLE001 - never fail the install over the optional backend
            print(f"jaxquant: the native int8 backend was NOT built ({type(e).__name__}: {e}); "
                  "jaxquant will use its pure-XLA kernels", file=sys.stderr)

    def _build(self, ext):
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
        dnnl_h = _wheel_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
        dnnl_inc = os.path.dirname(os.path.dirname(os.path.dirname(dnnl_h)))
        dnnl_so = _wheel_file("onednn-cpu-gomp", "libdnnl.so.3")
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cmd = [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp",
               "-Wno-return-type", "-I", dnnl_inc, "-I", _ffi_include(), *ext.sources, "-o", out,
               "-L", os.path.dirname(dnnl_so), "-l:libdnnl.so.3"]
        print("jaxquant: building the native backend:", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)


setup(
    ext_modules=[Extension("jaxquant.native._jaxquant_native", sources=[f"{CSRC}/jaxquant_native.cc",
                                                                     f"{CSRC}/weight_only_gemv.cc",
                                                                     f"{CSRC}/onednn_matmul_pool.cc",
                                                                     f"{CSRC}/decode_ops.cc"],
                           depends=[f"{CSRC}/onednn_common.h"],
                           optional=True)],
    cmdclass={"build_ext": OptionalNativeBuild},
)
