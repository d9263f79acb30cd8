"""brainvq: public brain T1 MRI collections to a trained VQ-VAE + PixelCNN prior."""

__version__ = "0.1.0"


def load_model(path, device: str = "cpu", strict_versions: bool = False, batch_size: int = 64):
    """Return the trained models of a run folder or model bundle (``brainvq.api.BrainModel``).

    See :func:`brainvq.api.load_model`; imported on first use, so ``import brainvq`` stays light.
    """
    from brainvq.api import load_model as load

    return load(path, device, strict_versions, batch_size)
