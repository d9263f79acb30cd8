"""brainvq: public brain T1 MRI collections to a trained VQ-VAE + PixelCNN prior."""

__version__ = "0.1.0"
