"""Docker graph-driver plugin: overlay2-compatible layers, thin images from CernVM-FS."""

__version__ = "0.1.0"
