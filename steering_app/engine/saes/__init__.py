"""Sparse autoencoders: the SAE module, its checkpoint formats and the pretrained registry."""
