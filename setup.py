"""vlmcore: fused Triton kernels and a DeepSpeed training core for vision-language models.

One distribution, four import names. The folders at the top of the repository map to them
through ``package_dir`` so that no generic top-level name (``kernels``, ``train``) is installed:

    vlmcore          <- vlmcore/   (nn.Modules: resampler, gated cross-attention, Flamingo, CLIP)
    vlmcore.kernels  <- kernels/   (Triton ops with autograd + plain-PyTorch references)
    vlmcore.train    <- train/     (DeepSpeed ZeRO trainer, data pipeline, configs)
    vlmcore.bench    <- bench/     (benchmarks against references and peers)
"""

import os

from setuptools import setup

# The four top-level folders and the import names they install as; every sub-folder with an
# __init__.py below them is a subpackage (vlmcore.train.data, vlmcore.blip, ...).
TOP_LEVEL = {"vlmcore": "vlmcore", "vlmcore.kernels": "kernels", "vlmcore.train": "train", "vlmcore.bench": "bench"}


def package_dirs() -> dict[str, str]:
    dirs = {}
    for name, folder in TOP_LEVEL.items():
        for here, subdirs, files in os.walk(folder):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith((".", "__")))
            if "__init__.py" in files:
                rel = os.path.relpath(here, folder)
                dirs[name if rel == "." else name + "." + rel.replace(os.sep, ".")] = here
    return dirs


PACKAGE_DIRS = package_dirs()

setup(
    name="vlmcore",
    version="0.1.0",
    description="Fused Triton kernels and a DeepSpeed ZeRO training core for frozen-LM vision-language models",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"vlmcore.train": ["configs/*.yaml", "configs/*.json"], "vlmcore.eval": ["imagenet.json"]},
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
        # vlmcore-eval: COCOEvalCap's scorers (they also need `java` on PATH) and the linear probe.
        "eval": ["pycocoevalcap", "pycocotools", "scikit-learn"],
        # The `video` data kind: PyAV decodes .mp4 / .webm members (its wheels bundle FFmpeg, CPU-only;
        # torchcodec needs a system FFmpeg, which these machines lack).
        "video": ["av"],
    },
    entry_points={
        "console_scripts": [
            "vlmcore-train=vlmcore.train.__main__:console_main",
            "vlmcore-make-shapes=vlmcore.train.tools.make_shapes:console_main",
            "vlmcore-bench=vlmcore.bench.__main__:console_main",
            "vlmcore-capfilt=vlmcore.train.tools.capfilt:console_main",
            "vlmcore-convert=vlmcore.train.tools.convert_vqa:console_main",
            "vlmcore-eval=vlmcore.eval.cli:console_main",
            "vlmcore-export=vlmcore.train.tools.export:console_main",
        ],
        # How vlmcore.eval (which imports nothing of the trainer) rebuilds a run directory's model.
        "vlmcore.run_loaders": ["trainer=vlmcore.train.tasks.run_loader:load"],
    },
)
