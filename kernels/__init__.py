"""fastvae's Triton kernels (installed as ``fastvae.kernels``): one module per op."""
