"""``FakeQuantModule``: a fake-quantize config and its state as an NNX module (PyTorch's
``FakeQuantize`` module used as ``activation_post_process`` / ``weight_fake_quant``).

The config (``FakeQuantize``, ``FusedMovingAvgObsFakeQuantize``, ``FixedQParamsFakeQuantize`` or
``LearnableFakeQuantize`` from :mod:`jaxquant.fake_quant`) is static; its state pytree (observer
statistics, current qparams, int32 enable flags) lives in a ``QuantStats`` variable, so flipping a
flag never retraces a jitted step. For ``LearnableFakeQuantize`` the scale and zero point are also
``nnx.Param``s, so an optimizer over ``nnx.Param`` trains them (LSQ).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.fake_quant.fake_quantize import FixedQParamsFakeQuantize
from jaxquant.fake_quant.learnable import LearnableFakeQuantize
from jaxquant.nn.variables import QuantStats
from jaxquant.observers.protocols import FakeQuant
from jaxquant.observers.base import check_observer_state

__all__ = ["FakeQuantModule", "is_learnable"]


def is_learnable(fake_quant: Any) -> bool:
    """Whether ``fake_quant`` (a config) has learnable (LSQ) scale and zero point."""
    return isinstance(fake_quant, LearnableFakeQuantize)


class FakeQuantModule(nnx.Module):
    """``y = fake_quant(x)`` with statistics/qparams updated as the config's flags say.

    Args:
      fake_quant: a fake-quantize config instance (``qconfig.activation()`` / ``qconfig.weight()``).
      example_or_shape: an example input or its shape; needed per channel to size the qparams.
    """

    def __init__(self, fake_quant: Any, example_or_shape: Any = None):
        if not isinstance(fake_quant, FakeQuant):
            raise TypeError(
                f"FakeQuantModule needs a fake-quantize config (FakeQuantize, FusedMovingAvgObsFakeQuantize, "
                f"LearnableFakeQuantize...), got {fake_quant!r}; QAT qconfigs must use fake quantize, e.g. "
                "get_default_qat_qconfig('x86')")
        self.fake_quant = fake_quant
        state = fake_quant.init(example_or_shape)
        if is_learnable(fake_quant):
            # The learnable values are Params (trained); the QuantStats copy holds the last estimate.
            self.scale = nnx.Param(jnp.asarray(state.scale, jnp.float32))
            self.zero_point = nnx.Param(jnp.asarray(state.zero_point, jnp.float32))
        self.stats = QuantStats(state)

    @property
    def learnable(self) -> bool:
        return is_learnable(self.fake_quant)

    def _state_for_apply(self) -> Any:
        state = self.stats.get_value()
        if self.learnable:
            state = dataclasses.replace(state, scale=self.scale.get_value(), zero_point=self.zero_point.get_value())
        return state

    def __call__(self, x: jax.Array) -> jax.Array:
        """Fake-quantize ``x`` (float32, any shape; per channel along the config's ``ch_axis``).

        Returns an array like ``x``; gradient straight-through (LSQ gradients for learnable configs).
        """
        y, new_state = self.fake_quant.apply(self._state_for_apply(), x)
        if self.learnable:
            # Keep the Params out of the forward's writes: they change only through the optimizer,
            # so a jax.jit step that returns (grads, QuantStats) loses nothing.
            new_state = dataclasses.replace(new_state, scale=jax.lax.stop_gradient(new_state.scale),
                                            zero_point=jax.lax.stop_gradient(new_state.zero_point))
        self.stats.set_value(new_state)
        return y

    @property
    def dtype(self) -> Any:
        return self.fake_quant.dtype

    @property
    def quant_range(self) -> tuple[int, int]:
        """Effective ``(quant_min, quant_max)`` of the fake quantization."""
        fq = self.fake_quant
        if hasattr(fq, "quant_range"):
            return tuple(fq.quant_range)  # type: ignore[return-value]
        return int(fq.quant_min), int(fq.quant_max)

    def _current_state(self) -> Any:
        """The state whose qparams are current: the learned Params once learning has taken over."""
        state = self.stats.get_value()
        if self.learnable and int(np.asarray(state.static_enabled)) == 0:
            state = dataclasses.replace(state, scale=self.scale.get_value(), zero_point=self.zero_point.get_value())
        return state

    def calculate_qparams(self) -> tuple[jax.Array, jax.Array]:
        """``(scale float32, zero_point int32)``: the observer's ``calculate_qparams`` (PyTorch's
        ``FakeQuantize.calculate_qparams``), or the learned values for LSQ in learning mode."""
        return self.fake_quant.calculate_qparams(self._current_state())

    def checked_qparams(self, path: str) -> tuple[jax.Array, jax.Array]:
        """Concrete qparams for ``convert``; raises ValueError naming ``path`` if the fake quant was never
        run (no training or calibration step) or its state went NaN/Inf."""
        fq = self.fake_quant
        state = self._current_state()
        learned = self.learnable and int(np.asarray(state.static_enabled)) == 0
        if not isinstance(fq, FixedQParamsFakeQuantize) and not learned:
            check_observer_state(fq.activation_post_process, state.observer, name=path)
        scale, zero_point = self.calculate_qparams()
        if not bool(np.all(np.isfinite(np.asarray(scale)))) or not bool(np.all(np.asarray(scale) > 0)):
            raise ValueError(f"'{path}': fake-quant scale is not finite and positive ({np.asarray(scale)}); "
                             "the QAT run diverged (check_qat_state(model) finds the first bad layer)")
        return scale, zero_point

    def nonfinite_fields(self) -> list[str]:
        """What in this module's state is NaN/Inf (empty when healthy): ``scale``, ``zero_point``, the
        learnable Params, or ``observed data`` when the observer had to skip non-finite inputs."""
        state = self.stats.get_value()
        bad = [name for name in ("scale", "zero_point")
               if not np.all(np.isfinite(np.asarray(getattr(state, name))))]
        if self.learnable:
            bad += [f"param {name}" for name in ("scale", "zero_point")
                    if not np.all(np.isfinite(np.asarray(getattr(self, name).get_value())))]
        if bool(np.any(np.asarray(getattr(state.observer, "nonfinite", False)))):
            bad.append("observed data (the input contained NaN/Inf)")
        return bad
