"""Backends: what runs the networks. First version: torch modules loaded by diffusers."""
