"""Engine adapters: one module per engine, the only place that imports an engine."""
