"""Model families, one readable plain-PyTorch file each."""
