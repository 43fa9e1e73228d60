"""Training-time defenses (DBD)."""
