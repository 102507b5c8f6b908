"""Serving: the slot batch, its scheduler, the kernels and the lean step, and generation."""
