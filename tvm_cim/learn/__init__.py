"""The learning side: offline datasets, the model zoo, quantization-aware training and the
training stages. Imports PyTorch, never TVM."""
