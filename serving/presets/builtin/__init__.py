"""Built-in style presets, one module each; every module here is imported by ``builtin_presets``."""
