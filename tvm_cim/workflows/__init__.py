"""Whole flows built on the other floors: the latency study behind ``tvm-cim report`` and
``make demo``."""
