"""Linen static int8 Conv/Dense run the native kernels: ``convert`` packs the oneDNN conv weight and
the GEMV weight once, from the concrete int8 weights, into the ``quant_cache`` collection (``apply``
packs inside the trace, where weights and zero points are tracers and the native kernels cannot
take them). Outputs equal the pure-XLA program's exactly; ``use_native(False)`` gives the pure-XLA
program (no custom call)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import jaxquant.linen as jql
from jaxquant.native import native_backend_available, native_backend_reason, use_native

needs_native = pytest.mark.skipif(not native_backend_available(),
                                  reason=f"native backend unavailable: {native_backend_reason()}")


class SmallCNN(nn.Module):
    """Regular 3x3 conv (padded), depthwise 5x5 stride 2 with TF-SAME (asymmetric) padding, 1x1,
    and a Dense head: each conv kind of EfficientNet once."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x))
        x = nn.relu6(nn.Conv(8, (5, 5), strides=(2, 2), padding="SAME", feature_group_count=8)(x))
        x = nn.Conv(12, (1, 1))(x)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def converted():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 3)).astype(np.float32))
    model = SmallCNN()
    variables = model.init(jax.random.key(0), x)
    with use_native(True):
        prepared = jql.prepare(model, jql.get_default_qconfig_mapping("x86"))
        stats = jql.calibrate(prepared, variables, [x])
        qmodel, qvars = jql.convert(prepared, stats, x)
    return qmodel, qvars, x


def _custom_calls(hlo: str) -> list[str]:
    return [t for t in ("jaxquant_conv_u8s8", "jaxquant_gemv_u8s8") for _ in range(hlo.count(f'"{t}"'))]


@needs_native
def test_convert_packs_the_native_weights_once(converted):
    _, qvars, _ = converted
    cache = qvars["quant_cache"]
    assert sorted(cache) == ["Conv_0", "Conv_1", "Conv_2", "Dense_0"]
    assert all(set(cache[f"Conv_{i}"]) == {"native_conv"} for i in range(3))
    assert cache["Conv_0"]["native_conv"].dtype == jnp.uint8 and cache["Conv_0"]["native_conv"].size >= 3 * 3 * 3 * 8
    # the GEMV layout: (ceil(N/64), ceil(K/4), 64, 4) int8, zero padded
    w = np.asarray(qvars["quant_params"]["Dense_0"]["weight_int"])
    g = np.asarray(cache["Dense_0"]["native_gemv"])
    assert g.shape == (1, 3, 64, 4)
    np.testing.assert_array_equal(g.transpose(1, 3, 0, 2).reshape(12, 64)[:12, :10], w)


@needs_native
def test_linen_native_equals_xla(converted):
    qmodel, qvars, x = converted
    x = x[:1]
    f = jax.jit(qmodel.apply)
    with use_native(True):
        compiled = f.lower(qvars, x).compile()
    with use_native(False):
        compiled_xla = f.lower(qvars, x).compile()
    calls = _custom_calls(compiled.as_text())
    assert calls.count("jaxquant_conv_u8s8") == 3, calls
    assert calls.count("jaxquant_gemv_u8s8") == 1, calls  # one row <= GEMV_MAX_M
    hlo_xla = compiled_xla.as_text()
    assert _custom_calls(hlo_xla) == []
    assert re.search(r"s32\[[^\]]*\]\S* dot\(", hlo_xla)  # the pure-XLA program runs its own int8 dots
    native, xla = np.asarray(compiled(qvars, x)), np.asarray(compiled_xla(qvars, x))
    # documented tolerance: the native kernels equal the pure-XLA ones bit for bit
    np.testing.assert_array_equal(native, xla)
    assert np.std(native) > 0


@needs_native
def test_linen_dense_above_the_gemv_rows_runs_the_matmul(converted):
    """Above GEMV_MAX_M rows the cached GEMV blob feeds oneDNN's matmul (csrc/onednn_matmul_pool.cc)."""
    qmodel, qvars, x = converted
    x8 = jnp.concatenate([x, -x, 0.5 * x, x + 0.25])  # 8 rows reach the Dense
    f = jax.jit(qmodel.apply)
    with use_native(True):
        compiled = f.lower(qvars, x8).compile()
    with use_native(False):
        xla = np.asarray(f(qvars, x8))
    assert compiled.as_text().count('"jaxquant_matmul_u8s8"') == 1
    native = np.asarray(compiled(qvars, x8))
    np.testing.assert_array_equal(native, xla)
    assert np.std(native) > 0


def test_without_the_cache_linen_runs_the_xla_program(converted):
    # variables converted with the backend off (or with the cache dropped before saving) run on XLA
    qmodel, qvars, x = converted
    plain = {k: v for k, v in qvars.items() if k != "quant_cache"}
    compiled = jax.jit(qmodel.apply).lower(plain, x).compile()
    assert _custom_calls(compiled.as_text()) == []
    assert np.std(np.asarray(compiled(plain, x))) > 0


@needs_native
def test_pack_native_rebuilds_the_cache_after_a_save_without_it(converted):
    qmodel, qvars, x = converted
    saved = {k: v for k, v in qvars.items() if k != "quant_cache"}
    rebuilt = jql.pack_native(qmodel, saved, x)
    assert jax.tree_util.tree_structure(rebuilt["quant_cache"]) == jax.tree_util.tree_structure(qvars["quant_cache"])
    for a, b in zip(jax.tree_util.tree_leaves(rebuilt["quant_cache"]), jax.tree_util.tree_leaves(qvars["quant_cache"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with use_native(False):
        assert "quant_cache" not in jql.pack_native(qmodel, saved, x)


def test_N01_pack_native_refuses_a_model_that_is_not_converted(converted):
    qmodel, qvars, x = converted
    with pytest.raises(TypeError, match="static QuantizedModel.*'observe'"):
        jql.pack_native(qmodel.replace(mode="observe"), qvars, x)


@needs_native
def test_N02_a_stale_cache_is_rebuilt_by_pack_native(converted):
    # Catalogue N02: the cache is derived from quant_params; after replacing the int8 weights it must be
    # rebuilt. With the stale cache the native program follows the old weights (documented, not detected).
    qmodel, qvars, x = converted
    qp = jax.tree_util.tree_map(lambda a: a, qvars["quant_params"])
    qp["Conv_2"] = {**qp["Conv_2"], "weight_int": -qp["Conv_2"]["weight_int"]}
    stale = {**qvars, "quant_params": qp}
    f = jax.jit(qmodel.apply)
    with use_native(False):
        want = np.asarray(f(stale, x[:1]))
    assert not np.array_equal(np.asarray(f(stale, x[:1])), want)
    np.testing.assert_array_equal(np.asarray(f(jql.pack_native(qmodel, stale, x), x[:1])), want)


def test_public_switch_is_reexported():
    assert jq.use_native is use_native
