from setuptools import find_packages, setup

setup(
    name="pgolf",
    version="0.1.0",
    description="Fused Triton kernels, a record-stack GPT and its train/quantize/eval pipeline for OpenAI Parameter Golf",
    packages=find_packages(include=["pgolf", "pgolf.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "triton", "sentencepiece", "numpy", "brotli", "scipy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"]},
    entry_points={"console_scripts": ["pgolf-train=pgolf.train.cli:main", "pgolf-bench=pgolf.bench.cli:main",
                                      "pgolf-pack=pgolf.quant.pack:main"]},
)
