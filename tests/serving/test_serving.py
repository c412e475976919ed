"""jaxquant.compile: the serving callable equals the model, pads/slices buckets, compiles ahead of time,
is safe under concurrent callers, serves Linen and plain functions, and fails clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns
from jaxquant.models.minilm import MiniLM, MiniLMConfig
from testkit.threads import run_in_threads


def _images(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, 28, 28, 1)).astype(np.float32))


def _rows(n, features=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, features)).astype(np.float32))


@pytest.fixture(scope="module")
def cnn_pair():
    """(float FashionCNN, its static int8 conversion), width 4, eval mode."""
    model = FashionCNN(width=4, rngs=nnx.Rngs(0))
    model.eval()
    prepared = jq.prepare(jq.fuse_modules(model, fusion_patterns(model)),
                          jq.QConfig(activation=jq.MinMaxObserver.with_args(reduce_range=True),
                                     weight=jq.default_per_channel_weight_observer))
    jq.calibrate(prepared, [_images(8, seed=1)], progress=False)
    return model, jq.convert(prepared)


def _mlp(seed=0):
    return nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(seed)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(seed + 1)))


def _split_jit(model):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: np.asarray(f(state, x))


# ---------------------------------------------------------------- outputs equal the model's


@pytest.mark.slow
def test_float_and_static_int8_cnn_equal_the_jitted_model_and_the_eager_call(cnn_pair):
    x = _images(3, seed=2)
    for model in cnn_pair:
        served = jq.compile(model)
        y = np.asarray(served(x))
        # The same program as jax.jit over split state: bit for bit.
        np.testing.assert_array_equal(y, _split_jit(model)(x))
        # And the eager (op-by-op) call, up to XLA's fusion of float ops.
        np.testing.assert_allclose(y, np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_dynamic_int8_equals_the_jitted_model_and_the_float_model_up_to_rounding():
    model = _mlp()
    int8 = jq.quantize_dynamic(model)
    x = _rows(5, seed=3)
    y = np.asarray(jq.compile(int8)(x))
    np.testing.assert_array_equal(y, _split_jit(int8)(x))
    # It is the float model up to int8 rounding (activation scale ~ range / 255).
    np.testing.assert_allclose(y, _split_jit(model)(x), atol=0.05)


@pytest.mark.slow
def test_multiple_inputs_minilm_ids_and_mask():
    config = MiniLMConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=16)
    model = jq.quantize_dynamic(MiniLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 40, size=(3, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], jnp.int32)
    served = jq.compile(model, buckets=(4,))
    y = np.asarray(served(ids, mask))
    assert y.shape == (3, 16)
    graphdef, state = nnx.split(model)
    reference = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))(state, ids, mask)
    np.testing.assert_array_equal(y, np.asarray(reference))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)  # unit-norm sentence embeddings


def test_outputs_as_pytrees_and_inputs_as_numpy():
    params = {"w": jnp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))}

    def fn(params, x):
        return {"y": x @ params["w"], "total": jnp.sum(params["w"])}

    served = jq.compile(fn, params, buckets=(2, 4))
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    out = served(x)
    np.testing.assert_array_equal(np.asarray(out["y"]), x @ np.arange(12, dtype=np.float32).reshape(3, 4))
    assert float(out["total"]) == 66.0  # not batched: left as is (a scalar)


# ---------------------------------------------------------------- bucketing


def test_buckets_pad_to_the_next_bucket_and_slice_back():
    model = _mlp()
    served = jq.compile(model, buckets=(8, 2, 4))
    assert served.buckets == (2, 4, 8)
    reference = _split_jit(model)
    for n in (1, 2, 3, 5, 8):
        x = _rows(n, seed=n)
        y = served(x)
        assert y.shape == (n, 4)
        np.testing.assert_allclose(np.asarray(y), reference(x), rtol=1e-6, atol=1e-6)
    # One program per bucket used, none per batch size.
    assert sorted(served.signatures) == ["float32[2, 8]", "float32[4, 8]", "float32[8, 8]"]


def test_bucket_padding_keeps_per_tensor_dynamic_quantization_exact():
    # Per-tensor dynamic activation qparams come from the min/max over the whole batch, so padding with
    # zero rows would change the real rows' results (layer 2 sees relu(bias) rows); repeating the last
    # real row does not.
    model = _mlp()
    # Real rows: hidden = relu(50 - sum(x) / 8) ~ 5; a zero row: hidden = relu(50) = 50.
    model.layers[0].kernel.set_value(jnp.full((8, 16), -1.0 / 8))
    model.layers[0].bias.set_value(jnp.full((16,), 50.0))
    int8 = jq.quantize_dynamic(model)
    x = 45.0 + _rows(3, seed=7)
    unpadded = _split_jit(int8)(x)
    served = jq.compile(int8, buckets=(8,))
    np.testing.assert_array_equal(np.asarray(served(x)), unpadded)
    zero_padded = _split_jit(int8)(jnp.concatenate([x, jnp.zeros((5, 8))]))[:3]
    assert not np.array_equal(zero_padded, unpadded)  # so the test above can fail


def test_bucket_errors():
    served = jq.compile(_mlp(), buckets=(2, 4))
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        served(_rows(5))
    with pytest.raises(ValueError, match="empty batch"):
        served(_rows(0))
    with pytest.raises(ValueError, match="buckets must be a non-empty list"):
        jq.compile(_mlp(), buckets=())
    with pytest.raises(ValueError, match="positive"):
        jq.compile(_mlp(), buckets=(0, 4))
    with pytest.raises(TypeError, match="positive ints"):
        jq.compile(_mlp(), buckets=(2.5,))
    two = jq.compile(lambda p, a, b: a + b, {}, buckets=(4,))
    with pytest.raises(ValueError, match="same leading"):
        two(_rows(2), _rows(3))


# ---------------------------------------------------------------- ahead of time


def test_example_inputs_compile_ahead_of_time():
    int8 = jq.quantize_dynamic(_mlp())
    spec = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    served = jq.compile(int8, example_inputs=(spec,))
    assert served.signatures == ["float32[2, 8]"]
    x = _rows(2, seed=4)
    np.testing.assert_array_equal(np.asarray(served(x)), _split_jit(int8)(x))
    assert served.signatures == ["float32[2, 8]"]  # the call compiled nothing new


def test_precompile_with_buckets_compiles_every_bucket():
    served = jq.compile(_mlp(), buckets=(1, 4))
    done = served.precompile(jax.ShapeDtypeStruct((3, 8), jnp.float32))
    assert done == ["float32[1, 8]", "float32[4, 8]"]
    assert sorted(served.signatures) == done


def test_served_int8_program_runs_u8_s8_dots_and_returns_only_the_output():
    int8 = jq.quantize_dynamic(nnx.Linear(64, 32, rngs=nnx.Rngs(0)))
    with jq.use_native(False):  # the pure-XLA kernels' dots (the native backend runs a GEMV custom call)
        hlo = jq.compile(int8).compiled(_rows(4, features=64)).as_text()
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    # The program's result is the model output alone: no copy of any weight or packed cache
    # (what nnx.jit over the module returns to propagate state updates).
    assert entry.split("->")[1].strip().startswith("f32[4,32]"), entry
    # Operand types are printed only in the header of the computation holding the dot.
    headers = [block.strip().splitlines()[0] for block in hlo.split("\n\n")
               if any(" dot(" in line for line in block.splitlines())]
    assert headers and all("u8[" in h and "s8[" in h and "-> s32[" in h for h in headers), headers


# ---------------------------------------------------------------- concurrency


def test_concurrent_callers_get_the_sequential_outputs():
    int8 = jq.quantize_dynamic(_mlp())
    inputs = [_rows(n, seed=10 + i) for i, n in enumerate((1, 2, 1, 2))]
    sequential = [_split_jit(int8)(x) for x in inputs]
    served = jq.compile(int8)  # cold: the threads race to fill the cache
    results = {}

    def worker(t):
        for r in range(3):
            for i in range(len(inputs)):
                k = (i + t) % len(inputs)
                results[(t, r, k)] = np.asarray(served(inputs[k]))

    errors = run_in_threads(worker, 4)
    assert not errors, errors
    assert len(results) == 4 * 3 * len(inputs)
    for (_, _, k), y in results.items():
        np.testing.assert_array_equal(y, sequential[k])
    assert sorted(served.signatures) == [f"float32[{n}, 8]" for n in (1, 2)]  # each compiled once


# ---------------------------------------------------------------- Linen and functions


@pytest.mark.slow
def test_linen_static_int8_model_with_variables():
    import flax.linen as nn

    import jaxquant.linen as jql

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))

    model = Net()
    x = _rows(2, seed=5)
    variables = model.init(jax.random.key(0), x)
    prepared = jql.prepare(model, jql.get_default_qconfig_mapping("x86"))
    calibrated = jql.calibrate(prepared, variables, [x])
    qmodel, qvariables = jql.convert(prepared, calibrated, x)
    served = jq.compile(qmodel, qvariables, buckets=(4,))
    np.testing.assert_array_equal(np.asarray(served(x)), np.asarray(jax.jit(qmodel.apply)(qvariables, x)))
    float_served = jq.compile(model, variables)
    np.testing.assert_allclose(np.asarray(float_served(x)), np.asarray(model.apply(variables, x)), rtol=1e-5, atol=1e-5)


def test_function_of_params_and_several_inputs():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))

    def fn(params, x, scale):
        return (x @ params["w"]) * scale

    served = jq.compile(fn, {"w": w})
    x, scale = _rows(3), jnp.float32(2.0)
    np.testing.assert_allclose(np.asarray(served(x, scale)), 2.0 * np.asarray(x) @ np.asarray(w), rtol=1e-5)


def test_program_object_with_apply_and_params():
    class Program:  # the shape of a converted graph-mode program: apply(params, *inputs) and params
        params = {"w": jnp.full((8, 2), 0.5)}

        @staticmethod
        def apply(params, x):
            return x @ params["w"]

    x = _rows(3)
    np.testing.assert_allclose(np.asarray(jq.compile(Program())(x)), np.asarray(x) @ np.full((8, 2), 0.5), rtol=1e-6)


# ---------------------------------------------------------------- errors


def test_wrong_rank_or_dtype_after_the_first_compile_is_a_clear_error():
    served = jq.compile(_mlp())
    served(_rows(2))
    with pytest.raises(TypeError, match=r"input 0 of Sequential is int32 of rank 2.*compiled for float32"):
        served(_rows(2).astype(jnp.int32))
    with pytest.raises(TypeError, match="rank 3"):
        served(_rows(2)[None])
    with pytest.raises(TypeError, match="structured as"):
        served(_rows(2), _rows(2))
    served(_rows(5))  # another batch size of the same kind is fine: it compiles


def test_model_changed_after_compile_is_detected():
    model = _mlp()
    served = jq.compile(model)
    unchecked = jq.compile(model, check_changes=False)
    x = _rows(2)
    before = np.asarray(served(x))
    # nnx.jit over the module writes equal copies of every array back into it: not a change.
    nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_array_equal(np.asarray(served(x)), before)
    nnx.update(model, jax.tree.map(lambda a: a * 2, nnx.state(model)))
    with pytest.raises(jq.ModelChangedError, match=r"'layers\.0\.kernel'.*jaxquant\.compile\(model\) again"):
        served(x)
    np.testing.assert_array_equal(np.asarray(unchecked(x)), before)  # the arrays captured at compile
    assert not np.array_equal(np.asarray(jq.compile(model)(x)), before)


def test_model_that_updates_its_state_when_called_is_refused():
    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
    with pytest.raises(jq.ModelMutatesStateError, match=r"layers\.1\.mean.*model\.eval\(\)"):
        jq.compile(model)(_rows(2))
    model.eval()
    jq.compile(model)(_rows(2))
    prepared = jq.prepare(_mlp(), jq.get_default_qconfig("x86"))
    with pytest.raises(jq.ModelMutatesStateError, match="prepared"):
        jq.compile(prepared)(_rows(2))


def test_dropout_in_training_mode_is_refused_and_rnn_rng_counters_are_not():
    class Net(nnx.Module):
        def __init__(self):
            self.rnn = nnx.RNN(nnx.LSTMCell(4, 4, rngs=nnx.Rngs(0)))  # advances its RNG count per call
            self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.drop(self.rnn(x))

    model = Net()
    with pytest.raises(jq.ModelMutatesStateError, match=r"Dropout in training mode \(drop\).*model\.eval\(\)"):
        jq.compile(model)
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32))
    served = jq.compile(model)
    np.testing.assert_array_equal(np.asarray(served(x)), np.asarray(served(x)))
    np.testing.assert_allclose(np.asarray(served(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    served(x)  # the eager call advanced the RNN's RNG count: not a change of the model


def test_model_errors_keep_their_type_and_say_where_they_came_from():
    def fn(params, x):
        raise ValueError("layer 'fc' wants 8 features")

    served = jq.compile(fn, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="wants 8 features") as info:
        served(_rows(1))
    if hasattr(info.value, "add_note"):  # Python >= 3.11
        assert any("jaxquant.compile compiled fn for inputs float32[1, 8]" in note for note in info.value.__notes__)


def test_forms_that_cannot_be_served():
    with pytest.raises(TypeError, match="without params"):
        jq.compile(_mlp(), {"w": 1})
    with pytest.raises(TypeError, match="pass its params"):
        jq.compile(lambda p, x: x)
    with pytest.raises(TypeError, match="pass its variables"):
        import flax.linen as nn
        jq.compile(nn.Dense(3))
    with pytest.raises(TypeError, match="cannot serve a int"):
        jq.compile(3)
    with pytest.raises(TypeError, match="one entry per model input"):
        jq.compile(_mlp(), example_inputs=_rows(2))
