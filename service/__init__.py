"""The recall service: FastAPI app, retrieval pipeline, Redis cache and event store."""
