"""Relax graph passes for the cim target: pattern table, partitioning, quantization rewrite."""
