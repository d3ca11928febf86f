"""vtr.kernels"""
