"""Shoal router component (see DESIGN.md); built out by its own issue."""
