"""Layers of Lipschitz (clipless) DP models, each with the `DPLayer` bounds."""

from torchdp_keras.lipschitz.layers.activations import DP_FullSort, DP_GroupSort, DP_ReLU
from torchdp_keras.lipschitz.layers.base import DPLayer
from torchdp_keras.lipschitz.layers.bias import DP_AddBias, DP_LayerCentering
from torchdp_keras.lipschitz.layers.bounded import DP_BoundedInput
from torchdp_keras.lipschitz.layers.clipping import DP_ClipGradient, clip_gradient
from torchdp_keras.lipschitz.layers.pooling import (
    DP_MaxPool2D,
    DP_ScaledGlobalL2NormPooling2D,
    DP_ScaledL2NormPooling1D,
    DP_ScaledL2NormPooling2D,
)
from torchdp_keras.lipschitz.layers.quick import (
    DP_QuickFrobeniusDense,
    DP_QuickSpectralConv2D,
    DP_QuickSpectralDense,
)
from torchdp_keras.lipschitz.layers.reshaping import (
    DP_Flatten,
    DP_GNP_Factory,
    DP_InputLayer,
    DP_Lambda,
    DP_Permute,
    DP_Reshape,
)
from torchdp_keras.lipschitz.layers.residual import (
    DP_MergeResidual,
    DP_SplitResidual,
    DP_WrappedResidual,
    make_residuals,
)
from torchdp_keras.lipschitz.layers.spectral import (
    DP_SpectralConv2D,
    DP_SpectralDense,
    spectral_projection,
)

__all__ = [
    "DPLayer",
    "DP_AddBias",
    "DP_BoundedInput",
    "DP_ClipGradient",
    "DP_Flatten",
    "DP_FullSort",
    "DP_GNP_Factory",
    "DP_GroupSort",
    "DP_InputLayer",
    "DP_Lambda",
    "DP_LayerCentering",
    "DP_MaxPool2D",
    "DP_MergeResidual",
    "DP_Permute",
    "DP_QuickFrobeniusDense",
    "DP_QuickSpectralConv2D",
    "DP_QuickSpectralDense",
    "DP_ReLU",
    "DP_Reshape",
    "DP_ScaledGlobalL2NormPooling2D",
    "DP_ScaledL2NormPooling1D",
    "DP_ScaledL2NormPooling2D",
    "DP_SplitResidual",
    "DP_SpectralConv2D",
    "DP_SpectralDense",
    "DP_WrappedResidual",
    "clip_gradient",
    "make_residuals",
    "spectral_projection",
]
