"""cp2image: synthesize single-cell images from CellProfiler features (a CellProfiler plugin + core)."""
from setuptools import find_packages, setup

setup(
    name="cp2image",
    version="0.1.0",
    description="Generate single-cell images from CellProfiler measurements (CP2Image, PyTorch)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cp2image_core", "cp2image_core.*"]),
    python_requires=">=3.9",
    install_requires=[
        # CellProfiler 4.2 (Python 3.8/3.9) needs numpy 1; the core alone also runs on numpy 2 (Python 3.11, 3.12)
        "numpy<2; python_version<'3.10'",
        "numpy; python_version>='3.10'",
        "h5py",
        "torch>=2.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tifffile",
        "scikit-image",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest>=7", "pytest-timeout", "ruff==0.17.6", "hypothesis"]},
    entry_points={"console_scripts": ["cp2image-train=cp2image_core.train:main"]},
)
