"""Models with known answers, for egp_fx's tests and benchmarks (nothing in the library imports
this package: the import-linter contract in pyproject.toml says so).

- planting.py: how to plant dead, constant and linear units with parameters, so that they hold
  for every input (BatchNorm shifts, zeroed rows, cancelling BatchNorms, any captured graph).
- planted.py: the planted networks and their oracles (a small conv net, ResNet-18, ViT-Tiny,
  OPT / LLaMA / BERT architectures), and the random inputs they are calibrated on.
- ranks.py: what every rank of a multi-process check builds the same way, and the records of a
  result that must agree across ranks.

torchvision, timm and transformers are imported where a model needs them.
"""
