"""Post-hoc repair defenses: fine-tuning, NAD, RNP, ANP, CLP (data-free)."""
