"""pfq: ProFound-Conv finetuning in JAX/Flax, for studying image quality in label-efficient finetuning."""

__version__ = "0.1.0"
