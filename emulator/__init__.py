"""The runtime: the only package that does I/O."""
