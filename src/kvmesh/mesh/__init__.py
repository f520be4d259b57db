"""The mesh: instances share KV blocks peer to peer, with no central server (docs/mesh.md)."""
