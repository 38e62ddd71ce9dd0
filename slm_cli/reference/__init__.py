"""Reference models (RHO-1) and their per-token scores stored beside a corpus."""
