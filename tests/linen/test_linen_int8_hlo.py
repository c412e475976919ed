"""Linen int8 models called the documented way (``jax.jit(qmodel.apply)(qvariables, x)``) compile to
u8 x s8 -> s32 dots: the int8 kernel is contracted as stored, so XLA has no transpose to fold into
the dot (which makes it upcast both operands to s32). Checked on the compiled HLO: the lowered
StableHLO shows ui8 x i8 either way."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant.linen as jql
from jaxquant.native import use_native


def dot_operand_types(hlo_text: str) -> list[tuple[str, str, str]]:
    """``(lhs, rhs, out)`` element types of every ``dot`` in a compiled HLO module, read from the
    instruction's operands (``%name = s32[..] dot(%a, %b)``) and their definitions."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo_text))
    # computation parameters: "(param_0: u8[...], param_1: s8[...])" headers
    for params in re.findall(r"^\S.*?\((.*?)\) -> ", hlo_text, flags=re.M):
        types.update(re.findall(r"([\w.\-]+): (\w+)\[", params))
    out = []
    for res, lhs, rhs in re.findall(r"= (\w+)\[[^\]]*\]\S* dot\(%?([\w.\-]+), %?([\w.\-]+)\)", hlo_text):
        out.append((types.get(lhs, "?"), types.get(rhs, "?"), res))
    return out


class DenseConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))              # im2col dot
        x = nn.Conv(6, (1, 1))(x)                       # 1x1 dot
        x = nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x)
        x = nn.DenseGeneral((4, 8), axis=-1)(x.reshape(x.shape[0], -1))
        return nn.Dense(16)(x.reshape(x.shape[0], -1))  # K=32 (XLA upcasts tiny dots anyway)


@pytest.fixture(scope="module")
def converted():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype(np.float32))
    model = DenseConvNet()
    variables = model.init(jax.random.key(0), x)
    prepared = jql.prepare(model, jql.get_default_qconfig_mapping("x86"))
    stats = jql.calibrate(prepared, variables, [x])
    qmodel, qvars = jql.convert(prepared, stats, x)
    return model, variables, qmodel, qvars, x


def test_static_linen_compiles_u8_s8_dots(converted):
    _, _, qmodel, qvars, x = converted
    with use_native(False):  # the native backend runs the convs and small Denses as custom calls
        hlo = jax.jit(qmodel.apply).lower(qvars, x).compile().as_text()
    dots = dot_operand_types(hlo)
    assert len(dots) == 5, dots  # every layer's int8 dot, none dropped
    assert all(d == ("u8", "s8", "s32") for d in dots), dots


def test_dynamic_linen_compiles_u8_s8_dots():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.relu(nn.Dense(16)(x)))

    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12)).astype(np.float32))
    model = MLP()
    variables = model.init(jax.random.key(1), x)
    qmodel, qvars = jql.quantize_dynamic(model, variables, x)
    hlo = jax.jit(qmodel.apply).lower(qvars, x).compile().as_text()
    dots = dot_operand_types(hlo)
    assert len(dots) == 2 and all(d == ("u8", "s8", "s32") for d in dots), dots


def test_the_counter_sees_s32_dots():
    # the check above can fail: an int32 x int32 dot is reported as such
    f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
    hlo = f.lower(jnp.zeros((4, 8), jnp.int32), jnp.zeros((8, 3), jnp.int32)).compile().as_text()
    assert dot_operand_types(hlo) == [("s32", "s32", "s32")]
