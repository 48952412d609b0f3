"""The bottom floor: leaves every other floor imports (errors, spec, atomic writes, optional imports,
the cache directory, rank statistics, parity, the layer map). Nothing here imports another floor."""
