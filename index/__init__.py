"""Item export, FAISS index, recall gate, versioned bundles and the reindex job.

What the service uses (search and loading only; it never builds indexes):

- ``index.bundle.current_bundle_dir(artifacts) -> Path | None`` and ``current_version(artifacts)``
- ``index.bundle.load_bundle(dir) -> LoadedBundle`` with ``manifest``, ``model`` (user tower),
  ``searcher``, ``id_map``, ``item_vectors``, ``popular``, ``user_features``, ``histories``,
  ``seen``, ``search(queries, k)`` and ``similar_items(item_id, k)``
- ``index.bundle.channel(prefix)``: the Redis pub/sub channel announcing new bundles
- ``index.searcher.IdMap``: catalogue item ids <-> FAISS int64 ids

The reindex job is ``index.reindex.run(ReindexConfig(...))``; the CLI is ``twotower reindex``.
"""
