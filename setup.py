"""vlmcore: fused Triton kernels and a DeepSpeed training core for vision-language models.

One distribution, four import names. The folders at the top of the repository map to them
through ``package_dir`` so that no generic top-level name (``kernels``, ``train``) is installed:

    vlmcore          <- vlmcore/   (nn.Modules: resampler, gated cross-attention, Flamingo, CLIP)
    vlmcore.kernels  <- kernels/   (Triton ops with autograd + plain-PyTorch references)
    vlmcore.train    <- train/     (DeepSpeed ZeRO trainer, data pipeline, configs)
    vlmcore.bench    <- bench/     (benchmarks against references and peers)
"""

from setuptools import setup

PACKAGE_DIRS = {
    "vlmcore": "vlmcore",
    "vlmcore.kernels": "kernels",
    "vlmcore.train": "train",
    "vlmcore.bench": "bench",
    "vlmcore.train.tasks": "train/tasks",
}

setup(
    name="vlmcore",
    version="0.1.0",
    description="Fused Triton kernels and a DeepSpeed ZeRO training core for frozen-LM vision-language models",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"vlmcore.train": ["configs/*.yaml", "configs/*.json"]},
    # Loose on purpose: GPU users keep the torch/triton build that matches their CUDA.
    # The CPU test environment pins exact versions in constraints-cpu.txt.
    install_requires=["torch>=2.5", "triton>=3.4", "numpy"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "hypothesis", "ruff"],
        "train": [
            "deepspeed==0.19.8",
            "transformers",
            "tokenizers",
            "webdataset",
            "braceexpand",
            "pillow",
            "tqdm",
            "pyyaml",
            "safetensors",
        ],
        "bench": ["matplotlib"],
        # model.vision types open_clip / timm and tokenizer type open_clip (they bring torchvision;
        # the CPU test environment installs them --no-deps instead, see the Makefile).
        "towers": ["open-clip-torch", "timm", "ftfy"],
    },
    entry_points={
        "console_scripts": [
            "vlmcore-train=vlmcore.train.__main__:console_main",
            "vlmcore-make-shapes=vlmcore.train.shapes:console_main",
            "vlmcore-bench=vlmcore.bench.__main__:console_main",
            "vlmcore-capfilt=vlmcore.train.capfilt:console_main",
        ]
    },
)
