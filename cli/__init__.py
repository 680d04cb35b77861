"""The `ballad` command line: parses options into library configs, calls `ballad_cache`, prints with rich."""
