"""Training: one engine (engine.py) shared by every objective (objectives/)."""
