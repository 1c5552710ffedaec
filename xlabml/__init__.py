"""XLab (Transformer Lab): GPT-style decoder language models on PyTorch Lightning."""

__version__ = "0.1.0"
