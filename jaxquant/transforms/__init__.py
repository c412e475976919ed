"""Model transforms: each takes a model and returns a new one (or edits it with ``inplace=True``)."""
from jaxquant.transforms.calibrate import calibrate, check_observers, make_calibration_step
from jaxquant.transforms.convert import convert, quantize
from jaxquant.transforms.prepare import prepare
from jaxquant.transforms.propagate import propagate_qconfig
from jaxquant.transforms.stubs import add_quant_dequant
