"""Packaging marker: ships this evaluate module with dpi-hf."""
