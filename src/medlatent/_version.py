"""The package's version, in a module that imports nothing, so any layer can stamp it into what it writes
(``checkpoints``' ``config.json``, latent files) without importing the package root."""

__version__ = "0.1.0"
