"""Data: sources -> shards (shard.py), the manifest, and the loader that reads shards in
rank- and worker-invariant global batches (loader.py over tarindex.py)."""
