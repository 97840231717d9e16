"""Data: shard formats, importers, the bundled sample set and the Ray Data training stream."""
