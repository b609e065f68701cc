"""``llava-bot serve``: a converted model behind the OpenAI-compatible chat-completions API."""
