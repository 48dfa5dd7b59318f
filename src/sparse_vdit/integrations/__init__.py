"""Integrations with model libraries (only diffusers so far)."""
