"""Model-inspection defenses: is this model backdoored, and towards which class (Neural Cleanse)."""
