"""Command-line launchers (absl): thin wrappers that parse flags and call the library."""
