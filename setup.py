"""foldtron: Megatron-style 5D-parallel LLM pretraining in plain PyTorch."""

from setuptools import setup

setup(
    name="foldtron",
    version="0.1.0",
    description="Megatron-style 5D-parallel pretraining (TP/SP, CP, EP with MoE folding, DP, PP) in PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["pretrain", "pretrain.model", "pretrain.objectives", "parallel", "data", "tools", "launch"],
    install_requires=[
        # torch is not pinned: a CPU machine installs its CPU build first (see README),
        # a GPU cluster keeps the CUDA build it already has.
        "torch>=2.6",
        # indexed .bin/.idx datasets and the compiled index helpers; runs on the CPU.
        "megatron-core>=0.16,<0.17",  # we use its dataset internals; raise the cap after testing a release
        "numpy",
        "pyyaml",
        "tensorboard",
        "tqdm",
        # tokenizers (Hugging Face tokenizer.json, SentencePiece) and .zst inputs of the preprocessing tools
        "tokenizers",
        "sentencepiece",
        "zstandard",
        # Hugging Face model folders, read and written by python -m tools.convert_checkpoint
        "safetensors",
    ],
    extras_require={
        # ruff: the lint step of .ci/run (ruff.toml); transformers: the reference of tests/test_hf_convert.py
        "test": ["pytest", "ruff", "transformers>=5", "safetensors"],  # v5: rope_parameters, dtype=
        # python -m tools.bench_train's baseline (Hugging Face's Llama); its tests skip that part without it
        "bench": ["transformers>=4.45"],
        # CUDA only: FP8 and fused layers.
        "te": ["transformer-engine[pytorch]"],
    },
)
