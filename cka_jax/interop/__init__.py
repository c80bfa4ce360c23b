"""Interoperability: porting PyTorch weights in, exporting students out, prediction on image
files. The only package that may import torch (inside functions)."""
