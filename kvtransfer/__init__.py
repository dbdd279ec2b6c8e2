"""KV block identity, pooling and movement: hashing (torch-free, shared with the router),
the block pool with its prefix cache, and (later) tiers and transfer backends."""
