"""Run in a fresh virtualenv holding only ``pip install -e .`` (no extras): the README's five-line
static PTQ, then ``jq.export`` and a call of the deserialized artifact. Exits non-zero on failure.

Used by tests/packaging/test_packaging.py (slow) and by .ci/run.
"""
import numpy as np


def main() -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxquant as jq
    from jaxquant.models.fashion_cnn import FashionCNN, fusion_patterns

    rng = np.random.default_rng(0)
    calibration_batches = [jnp.asarray(rng.uniform(size=(8, 28, 28, 1)).astype(np.float32)) for _ in range(2)]
    images = jnp.asarray(rng.uniform(size=(4, 28, 28, 1)).astype(np.float32))

    # The README's five lines
    model = FashionCNN(rngs=nnx.Rngs(0))
    model.eval()
    prepared = jq.prepare(jq.fuse_modules(model, fusion_patterns(model)), jq.get_default_qconfig("x86"))
    jq.calibrate(prepared, calibration_batches, progress=False)
    int8_model = jq.convert(prepared)
    logits = nnx.jit(lambda m, x: m(x))(int8_model, images)

    blob = jq.export(int8_model, images)
    again = jax.export.deserialize(bytearray(blob)).call(images)
    np.testing.assert_allclose(np.asarray(again), np.asarray(logits), rtol=1e-6, atol=1e-6)
    for optional in ("torch", "onnx", "matplotlib"):
        try:
            __import__(optional)
        except ModuleNotFoundError:
            continue
        raise SystemExit(f"'{optional}' is importable: this is not a core-only environment")
    print("core install OK:", logits.shape, len(blob), "bytes exported")


if __name__ == "__main__":
    main()
