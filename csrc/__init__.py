"""CUDA sources (torch-free kernels + thin binding), shipped as package data and compiled
lazily on first use on a CUDA machine. Importing this package touches no compiler or GPU."""
