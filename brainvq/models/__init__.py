"""Models: the slice autoencoder (brainvq.models.vqvae) and its bottlenecks (brainvq.models.quantizers)."""

from brainvq.models.quantizers import (
    CodeUsage,
    FiniteScalarQuantizer,
    GaussianBottleneck,
    IdentityBottleneck,
    QuantizerConfigError,
    VectorQuantizer,
)
from brainvq.models.vqvae import (
    BOTTLENECKS,
    VQVAE,
    ModelConfigError,
    ModelInputError,
    NotDiscreteError,
    build_bottleneck,
    build_vqvae,
)

__all__ = [
    "BOTTLENECKS",
    "VQVAE",
    "CodeUsage",
    "FiniteScalarQuantizer",
    "GaussianBottleneck",
    "IdentityBottleneck",
    "ModelConfigError",
    "ModelInputError",
    "NotDiscreteError",
    "QuantizerConfigError",
    "VectorQuantizer",
    "build_bottleneck",
    "build_vqvae",
]
