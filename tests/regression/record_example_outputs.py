"""Build every example model small and deterministically, quantize it, and collect its int8 outputs.

Used two ways:

* ``python tests/regression/record_example_outputs.py`` (re)records ``example_outputs.npz`` next to
  this file. It was recorded on the tree before the core renovation (issue #13) and must not be
  re-recorded to make a structural change pass: a structural change keeps every output bit-identical.
* ``tests/regression/test_example_outputs.py`` recomputes the same outputs and compares them bit for
  bit with the recorded file.

Models (random initialisation, fixed seeds, no training; small widths so the whole set runs in
seconds): Fashion CNN static PTQ, the QAT CNN (a few fake-quant training-mode steps, then convert),
a small MiniLM through ``quantize_dynamic`` (per-tensor, per-channel, per-token), the char LSTM
through ``quantize_dynamic``, a two-stage EfficientNet-Lite static PTQ (depthwise, 1x1, residual
adds), and the Linen quickstart CNN (static and QAT) and transformer block (dynamic), plus a Linen
ConvTranspose/Einsum/DenseGeneral model (static) so every int8 kernel is covered.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

# Recorded and checked at the test session's XLA level (tests/conftest.py): the float parts of the
# models (LayerNorm, softmax, pooling) round differently between LLVM optimisation levels.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import numpy as np  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "example_outputs.npz")


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def fashion_cnn_static() -> dict[str, np.ndarray]:
    import jax.numpy as jnp
    from flax import nnx

    import jaxquant as jq
    from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns

    model = FashionCNN(width=4, rngs=nnx.Rngs(0))
    model.eval()
    x = jnp.asarray(_rng(1).random((24, 28, 28, 1), np.float32))
    fused = jq.fuse_modules(model, fusion_patterns(model))
    prepared = jq.prepare(fused, jq.get_default_qconfig("x86"))
    jq.calibrate(prepared, [x[:12], x[12:]], progress=False)
    int8 = jq.convert(prepared)
    probe = jnp.asarray(_rng(2).random((3, 28, 28, 1), np.float32))
    return {"logits": np.asarray(int8(probe)), "logits_batch1": np.asarray(int8(probe[:1]))}


def qat_cnn() -> dict[str, np.ndarray]:
    import jax.numpy as jnp
    from flax import nnx

    import jaxquant as jq
    from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns

    model = FashionCNN(width=4, rngs=nnx.Rngs(3))
    fused = jq.fuse_modules_qat(model, fusion_patterns(model))
    fused.train()
    qat = jq.prepare_qat(fused, jq.get_default_qat_qconfig("x86"))
    for i in range(3):
        qat(jnp.asarray(_rng(10 + i).random((8, 28, 28, 1), np.float32)))
    qat.eval()
    int8 = jq.convert(qat)
    probe = jnp.asarray(_rng(4).random((3, 28, 28, 1), np.float32))
    return {"logits": np.asarray(int8(probe))}


def minilm_dynamic() -> dict[str, np.ndarray]:
    import jax.numpy as jnp
    from flax import nnx

    import jaxquant as jq
    from jaxquant.models.minilm import MiniLM, MiniLMConfig

    cfg = MiniLMConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=32)
    model = MiniLM(cfg, rngs=nnx.Rngs(5))
    ids = jnp.asarray(_rng(6).integers(1, 60, (2, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, 9:].set(0)
    per_channel = jq.QConfig(activation=jq.default_dynamic_qconfig.activation,
                             weight=jq.default_per_channel_weight_observer)
    out = {}
    out["per_tensor"] = np.asarray(jq.quantize_dynamic(model)(ids, mask))
    out["per_channel"] = np.asarray(jq.quantize_dynamic(model, {nnx.Linear: per_channel})(ids, mask))
    out["per_token"] = np.asarray(jq.quantize_dynamic(model, {nnx.Linear: per_channel}, per_token=True)(ids, mask))
    return out


def char_lstm_dynamic() -> dict[str, np.ndarray]:
    import jax.numpy as jnp
    from flax import nnx

    import jaxquant as jq

    class CharLSTM(nnx.Module):  # examples/char_lstm_dynamic.py's model
        def __init__(self, vocab: int, embed: int, hidden: int, rngs: nnx.Rngs):
            self.embed = nnx.Embed(vocab, embed, rngs=rngs)
            self.rnn = nnx.RNN(nnx.LSTMCell(embed, hidden, rngs=rngs))
            self.head = nnx.Linear(hidden, vocab, rngs=rngs)

        def __call__(self, tokens):
            return self.head(self.rnn(self.embed(tokens)))

    model = CharLSTM(30, 8, 16, nnx.Rngs(7))
    tokens = jnp.asarray(_rng(8).integers(0, 30, (2, 10)), jnp.int32)
    int8 = jq.quantize_dynamic(model, {nnx.Linear, nnx.LSTMCell})
    return {"logits": np.asarray(int8(tokens))}


def efficientnet_small() -> dict[str, np.ndarray]:
    import jax.numpy as jnp
    from flax import nnx

    import jaxquant as jq
    from jaxquant.models import efficientnet_lite as eff

    blocks = (eff.BlockConfig(1, 3, 1, 1, 8, 8), eff.BlockConfig(2, 5, 2, 2, 8, 12))
    model = eff.EfficientNetLite(blocks, stem_ch=8, head_ch=16, num_classes=5, rngs=nnx.Rngs(9))
    model.eval()
    images = _rng(10).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    x = eff.preprocess(images)
    fused = jq.fuse_modules(model, eff.fusion_patterns(model))
    observed = jq.prepare(fused, jq.get_default_qconfig("x86"))
    jq.calibrate(observed, [x[:3], x[3:]], progress=False)
    int8 = jq.convert(observed)
    probe = eff.preprocess(_rng(11).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8))
    return {"logits": np.asarray(int8(jnp.asarray(probe)))}


def _linen_classes():
    import flax.linen as nn

    class DigitsCNN(nn.Module):  # examples/linen_quickstart.py's CNN
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(16, (3, 3), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
            x = nn.Conv(32, (3, 3), strides=2, feature_group_count=2)(x)
            x = nn.relu(x)
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(64)(x))
            return nn.Dense(10)(x)

    class TransformerBlock(nn.Module):  # examples/linen_quickstart.py's block
        dim: int = 32
        heads: int = 4

        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
            h = nn.LayerNorm()(x)
            h = nn.Dense(4 * self.dim)(h)
            return x + nn.Dense(self.dim)(nn.gelu(h))

    class Mixed(nn.Module):  # the remaining int8 Linen kernels
        @nn.compact
        def __call__(self, x):
            x = nn.ConvTranspose(6, (3, 3), strides=(2, 2), padding="SAME")(x)
            x = nn.relu(x)
            x = nn.Conv(4, (1, 1))(x)
            x = nn.DenseGeneral((2, 3), axis=-1)(x)
            x = x.reshape(x.shape[0], x.shape[1], x.shape[2], 6)
            return nn.Einsum((6, 5), "nhwc,cd->nhwd")(x)

    return DigitsCNN, TransformerBlock, Mixed


def _linen_cnn():
    """The fused Linen CNN, its variables, calibration batches and probe (shared by static and QAT)."""
    import jax
    import jax.numpy as jnp

    import jaxquant.linen as jql

    x = jnp.asarray(_rng(12).random((16, 8, 8, 1), np.float32))
    model = _linen_classes()[0]()
    variables = model.init(jax.random.key(0), x)
    fused, fused_vars = jql.fuse_modules(model, variables, [("Conv_0", "BatchNorm_0")], x[:2])
    probe = jnp.asarray(_rng(13).random((3, 8, 8, 1), np.float32))
    return fused, fused_vars, [x[:8], x[8:]], probe


# The Linen models are one builder each ("linen/<output>", recorded under the same keys), so that
# pytest -n can spread them.
def linen_cnn_static() -> dict[str, np.ndarray]:
    import jax

    import jaxquant.linen as jql

    fused, fused_vars, calib, probe = _linen_cnn()
    prepared = jql.prepare(fused, jql.get_default_qconfig_mapping("x86"))
    stats_vars = jql.calibrate(prepared, fused_vars, calib)
    static_model, static_vars = jql.convert(prepared, stats_vars, calib[0])
    return {"": np.asarray(jax.jit(static_model.apply)(static_vars, probe))}


def linen_cnn_qat() -> dict[str, np.ndarray]:
    import jax

    import jaxquant.linen as jql

    fused, fused_vars, calib, probe = _linen_cnn()
    qat = jql.prepare_qat(fused, jql.get_default_qat_qconfig_mapping("x86"))
    _, stats = qat.apply(fused_vars, calib[0], mutable=[jql.QUANT_STATS])
    _, stats = qat.apply({**fused_vars, **stats}, calib[1], mutable=[jql.QUANT_STATS])
    qat_model, qat_vars = jql.convert(qat, {**fused_vars, **stats}, calib[0])
    return {"": np.asarray(jax.jit(qat_model.apply)(qat_vars, probe))}


def linen_block_dynamic() -> dict[str, np.ndarray]:
    import jax

    import jaxquant.linen as jql

    block = _linen_classes()[1]()
    tokens = jax.random.normal(jax.random.key(2), (2, 8, 32))
    block_vars = block.init(jax.random.key(3), tokens)
    dyn_model, dyn_vars = jql.quantize_dynamic(block, block_vars, tokens)
    return {"": np.asarray(jax.jit(dyn_model.apply)(dyn_vars, tokens))}


def linen_mixed_static() -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    import jaxquant.linen as jql

    mixed = _linen_classes()[2]()
    xm = jnp.asarray(_rng(14).normal(size=(4, 4, 4, 3)).astype(np.float32))
    mixed_vars = mixed.init(jax.random.key(4), xm)
    prepared = jql.prepare(mixed, jql.get_default_qconfig_mapping("x86"))
    stats_vars = jql.calibrate(prepared, mixed_vars, [xm[:2], xm[2:]])
    mixed_q, mixed_qvars = jql.convert(prepared, stats_vars, xm[:2])
    return {"": np.asarray(jax.jit(mixed_q.apply)(mixed_qvars, xm))}


BUILDERS: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "fashion_cnn_static": fashion_cnn_static,
    "qat_cnn": qat_cnn,
    "minilm_dynamic": minilm_dynamic,
    "char_lstm_dynamic": char_lstm_dynamic,
    "efficientnet_small": efficientnet_small,
    "linen/cnn_static": linen_cnn_static,
    "linen/cnn_qat": linen_cnn_qat,
    "linen/block_dynamic": linen_block_dynamic,
    "linen/mixed_static": linen_mixed_static,
}


def compute(names=None) -> dict[str, np.ndarray]:
    """``{"<model>/<output>": array}`` for the named builders (all by default)."""
    out = {}
    for name in names or BUILDERS:
        for key, value in BUILDERS[name]().items():
            out[f"{name}/{key}" if key else name] = value  # "": the builder has one output
    return out


if __name__ == "__main__":
    if "--force" not in sys.argv and os.path.exists(OUT):
        sys.exit(f"{OUT} exists; it is the pre-renovation baseline. Pass --force to overwrite it.")
    arrays = compute()
    np.savez_compressed(OUT, **arrays)
    for k, v in arrays.items():
        print(f"{k}: {v.dtype}{v.shape} sum={float(np.sum(v.astype(np.float64))):.6g}")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")
