"""Model architectures, layers and kernels; knows nothing of requests or the network."""
