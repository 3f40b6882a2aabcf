"""phiforge.kernels"""
