"""vitbatch bench: the main job, runnable on a fresh machine without downloads."""
