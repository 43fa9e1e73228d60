"""The training toolkit used by attacks and defenses (``trainer.*`` configs): Lightning modules, loaders,
optimisers and schedules, the one ``fit``, resumable safetensors checkpoints. It sits below the components
(attacks and defenses import it) and imports nothing from them or from the orchestration in ``engine/``."""
