"""Packaging for scaleclr: scale-out SimCLR on wide ResNets."""
from setuptools import find_packages, setup

setup(
    name="scaleclr",
    version="0.1.0",
    description="Scale-out SimCLR (Chen et al. 2020) for wide ResNets: DDP, DeepSpeed ZeRO, FSDP2, "
    "exact SyncBN and LARC, VISSL-compatible configs.",
    packages=find_packages(include=["scaleclr", "scaleclr.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "hydra-core==1.3.8",
        "tensorboard",
        "tqdm",
        "pillow",
        "numpy",
        "scikit-learn",  # ships the demo data (real handwritten-digit scans)
    ],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "dev": ["pytest", "pytest-timeout", "pytest-xdist"],
        "slurm": ["submitit==1.5.4"],  # config.SLURM.USE_SLURM=True (scaleclr/slurm.py)
        "plot": ["matplotlib"],  # python -m scaleclr.summary RUN --plot FILE.png (scaleclr/plot.py)
        # only tests/test_shards.py imports it (shards the library writes read unchanged); scaleclr reads and
        # writes WebDataset shards with the standard library's tarfile
        "webdataset": ["webdataset==1.0.2"],
    },
)
