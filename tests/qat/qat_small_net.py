"""The small Conv-BN-ReLU-Linear network the QAT workflow tests share."""
from flax import nnx

import jaxquant.nn as jqnn

H, C_IN, C_OUT, N_OUT = 6, 2, 4, 3


class Net(nnx.Module):
    def __init__(self, rngs):
        self.quant = jqnn.QuantStub()
        self.conv = nnx.Conv(C_IN, C_OUT, (3, 3), padding=1, rngs=rngs)
        self.bn = nnx.BatchNorm(C_OUT, momentum=0.9, rngs=rngs)
        self.relu = jqnn.ReLU()
        self.flatten = jqnn.Flatten()
        self.fc = nnx.Linear(H * H * C_OUT, N_OUT, rngs=rngs)
        self.dequant = jqnn.DeQuantStub()

    def __call__(self, x):
        x = self.relu(self.bn(self.conv(self.quant(x))))
        return self.dequant(self.fc(self.flatten(x)))
