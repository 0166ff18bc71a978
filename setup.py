from setuptools import find_packages, setup

setup(
    name="ds_trainer",
    version="0.1.0",
    description="DeepSpeed-accelerated distributed trainer for CLIP-based AI-generated image detectors",
    packages=find_packages(include=["ds_trainer", "ds_trainer.*"]),
    python_requires=">=3.10",
    # Ranges for users installing into their own environment; requirements.txt pins the
    # exact versions this repository is tested with (make venv installs those).
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.16",
        "transformers>=4.40",
        "webdataset>=0.2.86",
        "pydantic>=2.5",
        "pyyaml>=6.0",
        "pillow>=10.0",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # ds-trainer report
    ],
    # Optional features: logging.tensorboard, logging.wandb, model.lora, faster image decoding.
    extras_require={
        "test": ["pytest>=8"],
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.16"],
        "lora": ["peft>=0.10"],
        # data/fast_decode.py: libspng / libjpeg-turbo decoding with Pillow's exact pixels (else Pillow)
        "fast-decode": ["pyspng>=0.1.4", "simplejpeg>=1.9"],
        # benchmarks/vs_hf_trainer.py: the Hugging Face Trainer as the peer (never a runtime dependency)
        "bench": ["accelerate>=1.0", "transformers>=5.0"],
    },
    entry_points={"console_scripts": ["ds-trainer=ds_trainer.cli:main"]},
)
