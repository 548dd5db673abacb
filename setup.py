"""Distribution `deepseek-model`: one import namespace, `deepseek_model`.

The user-fixed top-level folders kernels/, convert/ and benchmarks/ are mapped into the namespace
(`deepseek_model.kernels`, ...) so that generic names never become top-level import packages.
"""

from setuptools import setup

setup(
    name="deepseek-model",
    version="0.1.0",
    description="DeepSeek-V3-style MoE transformers (MLA, DeepSeekMoE, MTP) in PyTorch and Triton, "
    "exact against the published weights on CPU",
    python_requires=">=3.10",
    packages=[
        "deepseek_model",
        "deepseek_model.checkpoint",
        "deepseek_model.commands",
        "deepseek_model.pretrained",
        "deepseek_model.recipes",
        "deepseek_model.rl",
        "deepseek_model.kernels",
        "deepseek_model.convert",
        "deepseek_model.benchmarks",
        "deepseek_model.configs",
    ],
    package_dir={
        "deepseek_model": "deepseek_model",
        "deepseek_model.kernels": "kernels",
        "deepseek_model.convert": "convert",
        "deepseek_model.benchmarks": "benchmarks",
        "deepseek_model.configs": "configs",
    },
    package_data={"deepseek_model.configs": ["*.json"], "deepseek_model.kernels": ["*.json"],
                  "deepseek_model.pretrained": ["mini-shakespeare/*"]},
    install_requires=[
        "torch",
        "safetensors",
        "einops",
        "numpy",
        "tqdm",
        "tokenizers",
        "jinja2",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # transformers: the oracle of the tests, pinned to the minor versions they were run with (5.40
        # removes the `past_key_values` argument the model benchmark passes)
        "test": ["pytest", "transformers>=5.23,<5.40", "tokenizers"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["deepseek-model = deepseek_model.cli:main"]},
)
