"""Post-hoc repair defenses: fine-tuning, NAD, RNP."""
