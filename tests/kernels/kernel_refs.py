"""numpy references and HLO readers shared by the kernel tests (imported by name: a conftest is not a
helpers module)."""
import numpy as np


def requantize_ref(acc, x_scale, w_scale, out_scale, out_zp, bias=None, relu=False, out_dtype=np.uint8):
    """fbgemm's output pipeline written out in numpy float32 (see jaxquant/kernels/requantize.py)."""
    atw = np.float32(x_scale) * np.asarray(w_scale, np.float32)
    mult = atw / np.float32(out_scale)
    y = np.asarray(acc).astype(np.float32)
    if bias is not None:
        y = y + np.asarray(bias, np.float32) / atw
    y = np.round(y * mult) + out_zp  # np.round is half-to-even
    lo, hi = (0, 255) if np.dtype(out_dtype) == np.uint8 else (-128, 127)
    if relu:
        lo = max(lo, out_zp)
    return np.clip(y, lo, hi).astype(out_dtype)


def dot_signatures(hlo_text: str) -> list[str]:
    """Header lines ``%comp (param_0: u8[..], param_1: s8[..]) -> s32[..]`` of every HLO
    computation that contains a dot (operand types are only printed in those headers)."""
    out = []
    for block in hlo_text.split("\n\n"):
        lines = block.strip().splitlines()
        if lines and any(" dot(" in l for l in lines):
            out.append(lines[0])
    return out


def entry_fusions(hlo_text: str) -> list[str]:
    entry = hlo_text[hlo_text.index("ENTRY"):]
    return [l for l in entry.splitlines() if " fusion(" in l]
