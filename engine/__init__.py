"""blockrep engine: volumes, their on-disk format, and the command line. Never imports nbdkit."""
