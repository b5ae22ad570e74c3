"""The shared contract: feature encoding, the tower modules, the checkpoint format and the artifact
plumbing (version names, paths inside the artifacts root, durable atomic writes)."""
