"""jaxquant: quantization for JAX and Flax NNX.

Static and dynamic post-training quantization, quantization-aware training and int8 inference on
CPU through ``jax.jit``, with the names of PyTorch's ``torch.ao.quantization`` eager-mode API.
"""
from jaxquant import graph
from jaxquant.choose_qparams import choose_qparams
from jaxquant.dtypes import (
    QDType,
    QScheme,
    bfloat16,
    float16,
    float32,
    per_channel_affine,
    per_channel_affine_float_qparams,
    per_channel_symmetric,
    per_tensor_affine,
    per_tensor_symmetric,
    qint32,
    qint4,
    qint8,
    quint4,
    quint8,
)
from jaxquant.export import export, load_exported
from jaxquant.fake_quant import (
    FakeQuantize,
    FakeQuantizeBase,
    FixedQParamsFakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    LearnableFakeQuantize,
    default_fake_quant,
    default_fixed_qparams_range_0to1_fake_quant,
    default_fixed_qparams_range_neg1to1_fake_quant,
    default_fused_act_fake_quant,
    default_fused_per_channel_wt_fake_quant,
    default_fused_wt_fake_quant,
    default_per_channel_weight_fake_quant,
    default_weight_fake_quant,
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
    fake_quantize_per_channel_affine,
    fake_quantize_per_tensor_affine,
)
from jaxquant.fusion import (
    fuse_conv_bn_weights,
    fuse_known_modules,
    fuse_linear_bn_weights,
    fuse_modules,
    fuse_modules_qat,
    get_fuser_method,
)
from jaxquant.module_paths import get_submodule, named_modules, set_submodule
from jaxquant.native import native_backend_available, native_backend_reason, use_native
from jaxquant.observers import (
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    MSEObserver,
    NoopObserver,
    ObserverBase,
    PercentileObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    RecordingObserver,
    ReuseInputObserver,
    check_observer_state,
    default_affine_fixed_qparams_observer,
    default_debug_observer,
    default_dynamic_quant_observer,
    default_fixed_qparams_range_0to1_observer,
    default_fixed_qparams_range_neg1to1_observer,
    default_float_qparams_observer,
    default_float_qparams_observer_4bit,
    default_histogram_observer,
    default_observer,
    default_per_channel_weight_observer,
    default_placeholder_observer,
    default_reuse_input_observer,
    default_symmetric_fixed_qparams_observer,
    default_weight_observer,
    per_channel_weight_observer_range_neg_127_to_127,
    weight_observer_range_neg_127_to_127,
)
from jaxquant.onnx_export import export_onnx
from jaxquant.qconfig import (
    QConfig,
    QConfigDynamic,
    bfloat16_dynamic_qconfig,
    default_activation_only_qconfig,
    default_debug_qconfig,
    default_dynamic_qconfig,
    default_per_channel_qconfig,
    default_qat_qconfig,
    default_qat_qconfig_v2,
    default_qconfig,
    default_reuse_input_qconfig,
    default_weight_only_qconfig,
    float16_dynamic_qconfig,
    float16_static_qconfig,
    float_qparams_weight_only_qconfig,
    float_qparams_weight_only_qconfig_4bit,
    get_default_qat_qconfig,
    get_default_qconfig,
    per_channel_dynamic_qconfig,
    per_token_dynamic_qconfig,
    qconfig_equals,
)
from jaxquant.nn.qconfig_mappings import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from jaxquant.qconfig_mapping import QConfigMapping, qconfig_for
from jaxquant.qtensor import QTensor, dequantize, quantize_per_channel, quantize_per_tensor
from jaxquant.quantization_mappings import get_default_static_quant_module_mappings
from jaxquant.serialization import CheckpointError, converted_template, load, rebuild_cache, save
from jaxquant.serving import CompiledModel, ModelChangedError, ModelMutatesStateError, compile
from jaxquant.tools import model_size_bytes
from jaxquant.tools.numeric_debugger import compare, compute_sqnr, sensitivity_analysis
from jaxquant.tools.summary import summary
from jaxquant.transforms import (
    calibrate,
    check_observers,
    convert,
    make_calibration_step,
    prepare,
    propagate_qconfig,
    quantize,
)
from jaxquant.transforms.fuse_activations import fuse_quantized_activations
from jaxquant.transforms.prepare_qat import (
    check_qat_state,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    enable_param_learning,
    enable_static_estimate,
    freeze_bn_stats,
    get_default_qat_module_mappings,
    prepare_qat,
    quantize_qat,
    update_bn_stats,
)
from jaxquant.transforms.quantize_dynamic import get_default_dynamic_quant_module_mappings, quantize_dynamic
from jaxquant.transforms.stubs import add_quant_dequant
from jaxquant.version import __version__
from jaxquant.weight_only import WeightOnlyConfig, int4_weight_only, int8_weight_only, quantize_weight_only
from jaxquant.weight_only.awq import quantize_awq
from jaxquant.weight_only.calibration import collect_linear_stats
from jaxquant.weight_only.gptq import quantize_gptq
from jaxquant.weight_only.smoothquant import smooth_quantize
