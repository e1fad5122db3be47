"""editkit: diffusion-based image editing and style transfer on Hugging Face diffusers."""

__version__ = "0.1.0"
