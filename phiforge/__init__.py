"""phiforge: the package root. The code lives in phiforge.engine, .kernels, .retrieval and .bench."""
__version__ = "0.1.0"
