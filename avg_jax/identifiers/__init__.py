"""Identifier tables: for every image, the token-id sequence a generative retriever must produce."""
