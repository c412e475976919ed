"""The small two-layer MLP's parameters and inputs that the graph-mode tests quantize (8 -> 16 -> 4)."""
import jax.numpy as jnp
import numpy as np


def mlp_params(seed: int = 0) -> dict:
    """``{"fc1": {"w": (8, 16), "b": (16,)}, "fc2": {"w": (16, 4), "b": (4,)}}`` float32, N(0, 0.3)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)  # noqa: E731
    return {"fc1": {"w": f(8, 16), "b": f(16)}, "fc2": {"w": f(16, 4), "b": f(4)}}


def mlp_inputs(seed: int = 1, n: int = 5) -> jnp.ndarray:
    """float32 ``(n, 8)``, N(0, 1)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8)), jnp.float32)
