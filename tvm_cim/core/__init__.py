"""The ground floor: the architecture, integer quantization semantics, precision configs
and the project's exceptions. Every other floor stands on it; it imports nothing above it,
nor TVM or PyTorch."""
