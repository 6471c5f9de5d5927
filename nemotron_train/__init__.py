"""nemotron-train: Megatron-style pretraining for Nemotron-H hybrid Mamba-2/Transformer models."""

__version__ = "0.1.0"
