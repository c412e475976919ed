"""BatchNorm folding for Linen models: ``fuse_modules`` folds an ``nn.BatchNorm``'s running statistics
into the ``nn.Conv`` / ``nn.Dense`` / ``nn.ConvTranspose`` it follows (the arithmetic of
:func:`jaxquant.fusion.fuse_conv_bn_weights`), removes the BatchNorm's variables, and returns a model
in which that BatchNorm is the identity. Paths are dotted Linen paths, e.g. ``[("Conv_0", "BatchNorm_0")]``.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax
from flax.core import unfreeze

from jaxquant.fusion.bn_folding import fuse_conv_bn_weights
from jaxquant.linen.interceptor import Record
from jaxquant.linen.model import QuantizedModel
from jaxquant.linen.transforms import as_quantized_model

FOLDABLE = (nn.Conv, nn.Dense, nn.ConvTranspose)


def _scope(path: str) -> tuple[str, ...]:
    return tuple(path.split(".")) if path else ()


def _get(tree: dict, scope: tuple) -> Any:
    for key in scope:
        tree = tree[key]
    return tree


def _set(tree: dict, scope: tuple, value: Any) -> None:
    for key in scope[:-1]:
        tree = tree[key]
    tree[scope[-1]] = value


def _pop(tree: dict, scope: tuple) -> None:
    for key in scope[:-1]:
        if key not in tree:
            return
        tree = tree[key]
    tree.pop(scope[-1], None)


def fuse_modules(model: Union[nn.Module, QuantizedModel], variables: Any, modules_to_fuse: Sequence[Sequence[str]],
                 *example_args: Any, **example_kwargs: Any) -> tuple[QuantizedModel, dict]:
    """Fold each ``(layer_path, batchnorm_path)`` pair; BatchNorm in eval mode (running statistics).

    ``example_args``/``example_kwargs`` run the model once to read the layers' attributes (epsilon,
    BatchNorm axis). Returns ``(model_with_fused_set, variables)``; pass the model on to ``prepare``.
    Raises KeyError / TypeError naming the path for an unknown path or a pair that cannot be folded.
    """
    qm = as_quantized_model(model)
    record = Record()
    rngs = example_kwargs.pop("rngs", None)

    def run(variables, rngs, *args):
        with nn.intercept_methods(qm.replace(mode="record").interceptor(record)):
            return qm.module.apply(variables, *args, rngs=rngs, **example_kwargs)

    jax.eval_shape(run, variables, rngs, *example_args)  # only the layers' attributes are needed
    seen = record.modules
    variables = jax.tree_util.tree_map(lambda x: x, dict(unfreeze(variables)))
    params, stats = variables["params"], variables.get("batch_stats", {})
    fused = set(qm.fused)
    for group in modules_to_fuse:
        group = tuple(group)
        if len(group) != 2:
            raise ValueError(f"fuse_modules: Linen fusion folds (layer, BatchNorm) pairs; got {group}. ReLUs are "
                             "functions in Linen, not modules, so they stay in the model's code")
        for p in group:
            if p not in seen:
                near = sorted(q for q in seen if q and (q.split(".")[0] == p.split(".")[0] or p.startswith(q)))[:8]
                raise KeyError(f"fuse_modules: no module at path '{p}' was called; paths: "
                               f"{near or sorted(q for q in seen if q)[:12]}")
        layer, bn = seen[group[0]], seen[group[1]]
        if type(layer) not in FOLDABLE or type(bn) is not nn.BatchNorm:
            raise TypeError(f"fuse_modules: cannot fold ({type(layer).__name__} '{group[0]}', {type(bn).__name__} "
                            f"'{group[1]}'); supported: (nn.Conv | nn.Dense | nn.ConvTranspose, nn.BatchNorm)")
        if bn.axis not in (-1,) and not (isinstance(bn.axis, int) and bn.axis < 0 and bn.axis == -1):
            raise ValueError(f"fuse_modules: '{group[1]}' normalises axis {bn.axis}; folding needs the channel axis -1")
        ls, bs = _scope(group[0]), _scope(group[1])
        lp, bp, bstat = _get(params, ls), _get(params, bs), _get(stats, bs)
        kernel, bias = lp["kernel"], lp.get("bias")
        gamma, beta = bp.get("scale"), bp.get("bias")
        mean, var = bstat["mean"], bstat["var"]
        transpose = type(layer) is nn.ConvTranspose and layer.transpose_kernel

        def fold(kernel, bias, mean, var, gamma, beta):
            return fuse_conv_bn_weights(kernel, bias, mean, var, bn.epsilon, gamma, beta, transpose=transpose)

        for _ in range(mean.ndim - 1):  # stacked by nn.scan / nn.vmap: fold each slice
            fold = jax.vmap(fold)
        new_kernel, new_bias = fold(kernel, bias, mean, var, gamma, beta)
        _set(params, ls, {**lp, "kernel": new_kernel, "bias": new_bias})
        _pop(params, bs)
        _pop(stats, bs)
        fused.add(group[1])
    return qm.replace(fused=frozenset(fused)), variables
