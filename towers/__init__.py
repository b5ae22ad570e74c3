"""The shared contract: feature encoding, the tower modules and the checkpoint format."""
