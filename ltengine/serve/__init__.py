"""OpenAI-compatible serving: protocol models, HTTP handlers, the engine loop thread, metrics.

    ltengine serve [MODEL] --kv-budget 40GiB --fraction 0.5      # or: python -m ltengine.serve [MODEL] ...

The app and the loop are importable without starting anything: ``create_app``, ``EngineLoop``."""
