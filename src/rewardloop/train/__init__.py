"""Training loops, one file per algorithm family, and the shared run plumbing."""
