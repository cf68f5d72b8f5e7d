"""napari-emdiffuse: electron-microscopy restoration with a conditional diffusion model (EMDiffuse)."""

__version__ = "0.1.0"
