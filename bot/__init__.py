"""llava-bot: a self-hosted Discord bot that answers questions about images with LLaVA on OpenVINO."""

__version__ = "0.1.0"
