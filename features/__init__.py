"""Data contracts, loaders, synthetic data and point-in-time features (shared by training and serving)."""
