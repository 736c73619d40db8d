"""ProFound-Conv in Flax: the network, its depthwise convolution, and a pure-function interface."""

from pfq.model.convnext import SIZES, Classifier, ConvNeXtV2, ModelSpec
from pfq.model.functional import abstract_variables, apply, count_params, features, init_variables

__all__ = [
    "SIZES",
    "Classifier",
    "ConvNeXtV2",
    "ModelSpec",
    "abstract_variables",
    "apply",
    "count_params",
    "features",
    "init_variables",
]
