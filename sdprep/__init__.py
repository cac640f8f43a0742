"""sdprep: prepare datasets for and train Stable Diffusion XL models."""

__version__ = "0.1.0"
