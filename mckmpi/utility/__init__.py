"""Small helpers shared by every layer: sizes, CPU lists, tables."""
