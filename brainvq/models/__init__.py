"""Models: the slice/volume autoencoder (brainvq.models.vqvae) and its bottlenecks (brainvq.models.quantizers,
brainvq.models.som); brainvq.models.spatial picks 2D or 3D layers."""

from brainvq.models.quantizers import (
    CodeUsage,
    FiniteScalarQuantizer,
    GaussianBottleneck,
    IdentityBottleneck,
    QuantizerConfigError,
    VectorQuantizer,
)
from brainvq.models.som import SOMQuantizer, grid_neighbours, layout_on_grid, most_square_grid
from brainvq.models.spatial import SpatialDimsError
from brainvq.models.vqvae import (
    BOTTLENECKS,
    VQVAE,
    Decoder,
    Encoder,
    ModelConfigError,
    ModelInputError,
    NotDiscreteError,
    ResidualBlock,
    build_bottleneck,
    build_vqvae,
)

__all__ = [
    "BOTTLENECKS",
    "VQVAE",
    "CodeUsage",
    "Decoder",
    "Encoder",
    "FiniteScalarQuantizer",
    "GaussianBottleneck",
    "IdentityBottleneck",
    "ModelConfigError",
    "ModelInputError",
    "NotDiscreteError",
    "QuantizerConfigError",
    "ResidualBlock",
    "SOMQuantizer",
    "SpatialDimsError",
    "VectorQuantizer",
    "build_bottleneck",
    "build_vqvae",
    "grid_neighbours",
    "layout_on_grid",
    "most_square_grid",
]
