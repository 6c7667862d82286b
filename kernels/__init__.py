"""fastvae's Triton kernels (installed as ``fastvae.kernels``): one module per op.

The two host-side helpers below size the launch grids. They are plain integer arithmetic:
``triton.cdiv`` and ``triton.next_power_of_2`` cost about 5 us each per call on the host (they
are Triton language builtins), several times per op, where a launch budget is tens of us.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers a >= 0, b >= 1."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()
