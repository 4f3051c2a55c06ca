"""Decoders: image + Plan -> restored image."""
