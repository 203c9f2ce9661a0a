"""TensorPoly-DS: modular adapters (LoRA, TLoRA, Poly, MHR, TensorPoly-I/II/X, (IA)^3) for
Hugging Face seq2seq models, trained with DeepSpeed and evaluated by few-shot adaptation."""

__version__ = "0.1.0"
