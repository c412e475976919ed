"""examples/fashion_mnist_qat.py --quick end to end: it trains, quantizes (PTQ and QAT, 8-bit and 4-bit
weights and activations), ships (save / load bit-exact / jax.export equal) and plots; the accuracies are sane."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion_mnist_qat.py"


@pytest.mark.slow
def test_example_quick(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Fashion-MNIST not installed")
    spec = importlib.util.spec_from_file_location("fashion_mnist_qat", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--quick", "--out", str(tmp_path)])
    acc = res["accuracy"]
    assert set(acc) == {"float", "PTQ int8", "QAT int8", "PTQ 4-bit weights", "PTQ 4-bit weights+activations",
                        "QAT 4-bit weights+activations"}
    # one epoch on 3000 images (QAT: on 1500): far above chance (10%), and int8 keeps what float learned
    assert acc["float"] > 55.0
    assert abs(acc["PTQ int8"] - acc["float"]) <= 2.0
    assert acc["QAT int8"] >= acc["float"] - 2.0
    assert acc["QAT 4-bit weights+activations"] >= acc["PTQ 4-bit weights+activations"] - 1.0
    # the losses are finite, and QAT froze observers then BatchNorm statistics inside its run
    assert (res["n_train"], res["n_qat_train"]) == (3000, 1500)
    for key, steps in (("float_loss", 3000 // 100), ("qat_int8_loss", 1500 // 100), ("qat_4bit_loss", 1500 // 100)):
        assert len(res[key]) == steps and np.all(np.isfinite(res[key]))
    for freeze in res["freeze_steps"].values():
        assert 0 < freeze["observers"] < freeze["BN stats"] < 1500 // 100
    # shipped: int8 checkpoint about a quarter of the float one, reloaded and exported outputs identical
    assert res["reload_bit_exact"] and res["export_equal"]
    assert res["size_ratio"] <= 0.27
    # the exported artifact carries the int8 weights, not float ones
    assert 0.5 * res["int8_bytes"] < res["export_bytes"] < 0.5 * res["float_bytes"]
    png = tmp_path / "qat_curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _example_module():
    spec = importlib.util.spec_from_file_location("fashion_mnist_qat_plot", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ACC = {"float": 72.0, "PTQ int8": 71.5, "QAT int8": 75.9, "PTQ 4-bit weights": 71.0,
       "PTQ 4-bit weights+activations": 52.3, "QAT 4-bit weights+activations": 69.8}


def test_plot_has_labels_an_accuracy_panel_and_a_legend_off_the_data():
    pytest.importorskip("matplotlib")
    mod = _example_module()
    rng = np.random.default_rng(0)
    curve = list(1.0 + rng.random(60))
    fig = mod.make_figure(curve, {"QAT int8": (curve, {"observers": 20, "BN stats": 40}),
                                  "QAT 4-bit weights+activations": (curve, {"observers": 25, "BN stats": 45})}, ACC)
    axes = fig.axes
    assert len(axes) == 3
    assert all(ax.get_xlabel() or ax is axes[2] for ax in axes) and all(ax.get_ylabel() for ax in axes)
    # the accuracy panel: one bar per model, at its accuracy (the 4-bit story: PTQ drop, QAT recovery)
    heights = [b.get_height() for b in axes[2].patches]
    assert heights == list(ACC.values())
    # the QAT legend lies outside the plotting area, so it hides no curve
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend_box = axes[1].get_legend().get_window_extent(renderer)
    axes_box = axes[1].get_window_extent(renderer)
    assert not legend_box.overlaps(axes_box)
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_quick_caveat_names_the_run_above_float():
    text = _example_module().quick_caveat(ACC)
    assert "--quick" in text and "undertrained" in text and "QAT int8 is +3.90 points" in text
