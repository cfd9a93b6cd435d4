"""Development tools for a checkout of this repository: never shipped in the wheel."""
