"""Vision attacks: BadNets, Blended, WaNet, label-consistent, SIG and Trojan (TrojanNN).

Every attack maps uint8 images ``[N, C, H, W]`` to uint8 images (``apply_trigger``), poisons the attacker's
training set as a delta with provenance and trains a fresh victim on it with the attacker's schedule
(``attack.epochs``/``lr``/``batch_size``, null = ``trainer.*``).
"""
