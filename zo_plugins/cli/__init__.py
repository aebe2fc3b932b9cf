"""Command-line entry points: zo-train (LightningCLI) and zo-replay."""
