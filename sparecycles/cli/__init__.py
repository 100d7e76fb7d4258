"""Command-line entry points: the embedded broker, the demo and the process helpers they share."""
