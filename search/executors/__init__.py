"""Executors: run a study's trials here (local) or on a Ray instance or cluster (Ray)."""
