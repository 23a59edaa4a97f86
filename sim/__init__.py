"""Engine simulator: a vLLM-compatible engine replica on a real-time or virtual clock."""
